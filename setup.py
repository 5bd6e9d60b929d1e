"""The one compiled module, segapp._upsampling; everything else is in setup.cfg.

optional=True: where it cannot be built (no C compiler), segapp installs without it and upsamples with NumPy
(segapp/upsampling.py), the same masks at about a third of the speed (docs/benchmarks.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "segapp._upsampling",
            ["segapp/_upsampling.c"],
            # Each float32 product and sum rounded on its own, as NumPy does: a fused multiply-add would move the
            # last bit of a near tie, and so the mask.
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
