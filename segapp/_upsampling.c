/* The compiled path of segapp.upsampling.upsample_argmax: the same contract and the same algorithm as its NumPy
 * path, which stays as the fallback (tests/test_upsampling.py checks that both agree with a plain reference).
 *
 * Built with -ffp-contract=off (setup.py): every product and sum is rounded to float32 on its own, as NumPy does;
 * a fused multiply-add would change the last bit of a near tie and so the mask. The taps are computed as they are
 * needed, so the memory used beyond the mask is two bytes a source pixel, whatever the output's shape.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* An axis: `out` output pixels from `source` pixels, and source / out in float64, as NumPy divides it. */
typedef struct {
    Py_ssize_t out, source;
    double scale;
} Axis;

static Axis
axis(Py_ssize_t out, Py_ssize_t source)
{
    Axis a = {out, source, (double)source / (double)out};
    return a;
}

/* One output index's bilinear taps along an axis: segapp.upsampling._Taps, computed the same way. */
typedef struct {
    Py_ssize_t first, second;
    float keep, weight;
} Tap;

static inline Tap
tap(const Axis *a, Py_ssize_t o)
{
    /* float64 position, clamped, then rounded to float32: NumPy's (arange(out) + 0.5) * (source / out) - 0.5 */
    const Py_ssize_t source = a->source;
    double position = ((double)o + 0.5) * a->scale - 0.5;
    if (position < 0.0) {
        position = 0.0;
    } else if (position > (double)(source - 1)) {
        position = (double)(source - 1);
    }
    const float rounded = (float)position;
    Tap t;
    t.first = (Py_ssize_t)rounded;
    t.second = t.first + 1 < source ? t.first + 1 : source - 1;
    t.weight = rounded - (float)t.first;
    t.keep = 1.0f - t.weight;
    return t;
}

/* low: the argmax of each source pixel. certain: cells whose four corners share a class that beats every lower
 * class by `margin`, where every output pixel has that class (see upsample_argmax's docstring). */
static void
classify_cells(const float *logits, Py_ssize_t source_h, Py_ssize_t source_w, Py_ssize_t classes, int everywhere,
               float margin, uint8_t *low, uint8_t *certain)
{
    const Py_ssize_t cells = source_h * source_w;
    /* Sure per source pixel first, then certain per cell in place: cell (r, c) is the last to read pixel (r, c). */
    uint8_t *sure = certain;
    for (Py_ssize_t i = 0; i < cells; i++) {
        const float *a = logits + i * classes;
        float winner = a[0];
        uint8_t index = 0;
        for (Py_ssize_t k = 1; k < classes; k++) {
            if (a[k] > winner) {
                winner = a[k];
                index = (uint8_t)k;
            }
        }
        low[i] = index;
        uint8_t ok = !everywhere;
        for (Py_ssize_t lower = 0; ok && lower < index; lower++) {
            ok = winner - a[lower] > margin;
        }
        sure[i] = ok;
    }
    for (Py_ssize_t r = 0; r < source_h; r++) {
        const Py_ssize_t below = (r + 1 < source_h ? r + 1 : r) * source_w;
        for (Py_ssize_t c = 0; c < source_w; c++) {
            const Py_ssize_t right = c + 1 < source_w ? c + 1 : c, at = r * source_w;
            const uint8_t corner = low[at + c];
            certain[at + c] = sure[at + c] && sure[at + right] && sure[below + c] && sure[below + right]
                              && low[at + right] == corner && low[below + c] == corner
                              && low[below + right] == corner;
        }
    }
}

/* The argmax over classes of upper * keep_y + lower * weight_y, ties to the lower class (a NaN, as np.maximum
 * makes it the best so far, stops every later class from winning). */
static uint8_t
vertical_argmax(const float *upper, const float *lower, Py_ssize_t classes, float keep_y, float weight_y)
{
    float best = upper[0] * keep_y + lower[0] * weight_y;
    uint8_t index = 0;
    for (Py_ssize_t k = 1; k < classes; k++) {
        const float value = upper[k] * keep_y + lower[k] * weight_y;
        if (value > best) {
            best = value;
            index = (uint8_t)k;
        } else if (value != value) {
            best = value;
        }
    }
    return index;
}

/* Rows of a band whose taps are worked out once for all its columns; longer bands (the clamped edges of a tall
 * image) compute the rest as they go. */
#define BAND_ROWS 256

/* The mask, one band of output rows at a time: the rows whose first tap is source row r. Its first row is the
 * low-resolution classes along the row, the others copies; then in each uncertain cell every pixel is computed,
 * the horizontal pass once per column for the whole band. span_start/span_end: the output columns whose first tap
 * is each source column (one run each, as the firsts never decrease). */
static void
fill(uint8_t *mask, const Axis *rows, const Axis *cols, const float *logits, Py_ssize_t classes,
     const uint8_t *low, const uint8_t *certain, const Py_ssize_t *span_start, const Py_ssize_t *span_end)
{
    const Py_ssize_t height = rows->out, width = cols->out, source_w = cols->source;
    float upper[256], lower[256];
    Tap band_taps[BAND_ROWS];
    Py_ssize_t band = 0;
    while (band < height) {
        const Tap row = tap(rows, band);
        const Py_ssize_t r = row.first;
        Py_ssize_t next = band + 1;
        band_taps[0] = row;
        for (Tap t; next < height && (t = tap(rows, next)).first == r; next++) {
            if (next - band < BAND_ROWS) {
                band_taps[next - band] = t;
            }
        }
        uint8_t *first_row = mask + band * width;
        for (Py_ssize_t c = 0; c < source_w; c++) {
            for (Py_ssize_t x = span_start[c]; x < span_end[c]; x++) { /* spans of a few pixels: no memset */
                first_row[x] = low[r * source_w + c];
            }
        }
        for (Py_ssize_t y = band + 1; y < next; y++) {
            memcpy(mask + y * width, first_row, (size_t)width);
        }
        for (Py_ssize_t c = 0; c < source_w; c++) {
            if (certain[r * source_w + c]) {
                continue;
            }
            for (Py_ssize_t x = span_start[c]; x < span_end[c]; x++) {
                const Tap column = tap(cols, x);
                const float *tl = logits + (r * source_w + column.first) * classes;
                const float *tr = logits + (r * source_w + column.second) * classes;
                const float *bl = logits + (row.second * source_w + column.first) * classes;
                const float *br = logits + (row.second * source_w + column.second) * classes;
                for (Py_ssize_t k = 0; k < classes; k++) {
                    upper[k] = tl[k] * column.keep + tr[k] * column.weight;
                    lower[k] = bl[k] * column.keep + br[k] * column.weight;
                }
                for (Py_ssize_t y = band; y < next; y++) {
                    const Tap at = y - band < BAND_ROWS ? band_taps[y - band] : tap(rows, y);
                    mask[y * width + x] = vertical_argmax(upper, lower, classes, at.keep, at.weight);
                }
            }
        }
        band = next;
    }
}

/* A C-contiguous buffer of `ndim` dimensions and items of `itemsize` bytes (writable for the mask). */
static int
take_buffer(PyObject *object, Py_buffer *view, int ndim, Py_ssize_t itemsize, int writable, const char *name)
{
    if (PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        return -1;
    }
    if (view->ndim != ndim || view->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions of %zd-byte items", name, ndim, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(upsample_argmax_doc,
"upsample_argmax(mask, logits, everywhere, margin)\n"
"--\n\n"
"Writes into `mask` (uint8, height x width, C order) the argmax of `logits` (float32, source height x source\n"
"width x classes, C order) upsampled bilinearly, copying the low-resolution class in cells certain by `margin`\n"
"unless `everywhere`. See segapp.upsampling.upsample_argmax.");

static PyObject *
upsample_argmax(PyObject *module, PyObject *args)
{
    PyObject *mask_object, *logits_object;
    int everywhere;
    float margin;
    if (!PyArg_ParseTuple(args, "OOpf", &mask_object, &logits_object, &everywhere, &margin)) {
        return NULL;
    }
    Py_buffer mask, logits;
    if (take_buffer(mask_object, &mask, 2, 1, 1, "mask") < 0) {
        return NULL;
    }
    if (take_buffer(logits_object, &logits, 3, sizeof(float), 0, "logits") < 0) {
        PyBuffer_Release(&mask);
        return NULL;
    }
    PyObject *result = NULL;
    uint8_t *scratch = NULL;
    Py_ssize_t *spans = NULL;
    const Py_ssize_t height = mask.shape[0], width = mask.shape[1];
    const Py_ssize_t source_h = logits.shape[0], source_w = logits.shape[1], classes = logits.shape[2];
    if (logits.format == NULL || strcmp(logits.format, "f") != 0 || source_h < 1 || source_w < 1 || classes < 1
        || classes > 256) {
        PyErr_SetString(PyExc_ValueError, "logits: expected float32, at least 1 x 1 x 1, at most 256 classes");
        goto done;
    }
    scratch = PyMem_Malloc((size_t)(2 * source_h * source_w));
    spans = PyMem_Calloc((size_t)(2 * source_w), sizeof(Py_ssize_t));
    if (scratch == NULL || spans == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const Axis rows = axis(height, source_h), cols = axis(width, source_w);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t x = 0, previous = -1; x < width; x++) {
        const Py_ssize_t first = tap(&cols, x).first;
        if (first != previous) {
            spans[first] = x;
            previous = first;
        }
        spans[source_w + first] = x + 1;
    }
    classify_cells(logits.buf, source_h, source_w, classes, everywhere, margin, scratch,
                   scratch + source_h * source_w);
    fill(mask.buf, &rows, &cols, logits.buf, classes, scratch, scratch + source_h * source_w, spans,
         spans + source_w);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(scratch);
    PyMem_Free(spans);
    PyBuffer_Release(&logits);
    PyBuffer_Release(&mask);
    return result;
}

static PyMethodDef methods[] = {
    {"upsample_argmax", upsample_argmax, METH_VARARGS, upsample_argmax_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "segapp._upsampling", "The compiled path of segapp.upsampling.", -1, methods,
};

PyMODINIT_FUNC
PyInit__upsampling(void)
{
    return PyModule_Create(&module);
}
