"""Training, evaluation and export of the demonstration model (segapp-train, segapp-eval), and its synthetic scenes.

Serving never imports this subpackage: the server runs the exported model through segapp.inference alone.
"""
