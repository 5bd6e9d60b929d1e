/* The compiled path of segapp.upsampling.upsample_argmax: the same contract and the same algorithm as its NumPy
 * path, which stays as the fallback (tests/test_upsampling.py checks that both agree with a plain reference).
 *
 * Built with -ffp-contract=off (setup.py): every product and sum is rounded to float32 on its own, as NumPy does;
 * a fused multiply-add would change the last bit of a near tie and so the mask.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const Py_ssize_t *first, *second;
    const float *keep, *weight;
    Py_ssize_t out, source;
} Taps;

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

/* The mask, one band of output rows at a time: the rows whose first tap is source row r. Its first row is the
 * low-resolution classes along the row, the others copies; then in each uncertain cell every pixel is computed,
 * the horizontal pass once per column for the whole band. */
static void
fill(uint8_t *mask, const float *logits, Py_ssize_t source_w, Py_ssize_t classes, const uint8_t *low,
     const uint8_t *certain, const Taps *rows, const Taps *cols, const Py_ssize_t *span_start,
     const Py_ssize_t *span_end)
{
    const Py_ssize_t width = cols->out;
    float upper[256], lower[256];
    for (Py_ssize_t band = 0, next; band < rows->out; band = next) {
        const Py_ssize_t r = rows->first[band], below = rows->second[band];
        for (next = band + 1; next < rows->out && rows->first[next] == r; next++) {
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
                const float *tl = logits + (r * source_w + cols->first[x]) * classes;
                const float *tr = logits + (r * source_w + cols->second[x]) * classes;
                const float *bl = logits + (below * source_w + cols->first[x]) * classes;
                const float *br = logits + (below * source_w + cols->second[x]) * classes;
                for (Py_ssize_t k = 0; k < classes; k++) {
                    upper[k] = tl[k] * cols->keep[x] + tr[k] * cols->weight[x];
                    lower[k] = bl[k] * cols->keep[x] + br[k] * cols->weight[x];
                }
                for (Py_ssize_t y = band; y < next; y++) {
                    mask[y * width + x] = vertical_argmax(upper, lower, classes, rows->keep[y], rows->weight[y]);
                }
            }
        }
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

/* One axis's taps from four buffers of `out` items: first <= second < source, the firsts never decreasing. */
static int
check_taps(Taps *taps, const Py_buffer *views, const char *axis)
{
    for (int i = 0; i < 4; i++) {
        if (views[i].shape[0] != taps->out) {
            PyErr_Format(PyExc_ValueError, "%s taps: expected %zd of each", axis, taps->out);
            return -1;
        }
    }
    taps->first = views[0].buf;
    taps->second = views[1].buf;
    taps->keep = views[2].buf;
    taps->weight = views[3].buf;
    for (Py_ssize_t o = 0; o < taps->out; o++) {
        if (taps->first[o] < 0 || taps->second[o] < taps->first[o] || taps->second[o] >= taps->source
            || (o > 0 && taps->first[o] < taps->first[o - 1])) {
            PyErr_Format(PyExc_ValueError, "%s taps out of order or out of range at %zd", axis, o);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(upsample_argmax_doc,
"upsample_argmax(mask, logits, everywhere, margin, rows_first, rows_second, rows_keep, rows_weight,\n"
"                cols_first, cols_second, cols_keep, cols_weight)\n"
"--\n\n"
"Writes into `mask` (uint8, height x width) the argmax of `logits` (float32, source height x source width x\n"
"classes) upsampled with each axis's taps (intp firsts and seconds, float32 weights), copying the low-resolution\n"
"class in cells certain by `margin` unless `everywhere`. Arrays C-contiguous; see segapp.upsampling.");

static PyObject *
upsample_argmax(PyObject *module, PyObject *args)
{
    PyObject *objects[10];
    int everywhere;
    float margin;
    if (!PyArg_ParseTuple(args, "OOpfOOOOOOOO", &objects[0], &objects[1], &everywhere, &margin, &objects[2],
                          &objects[3], &objects[4], &objects[5], &objects[6], &objects[7], &objects[8],
                          &objects[9])) {
        return NULL;
    }
    static const char *names[10] = {"mask", "logits", "rows_first", "rows_second", "rows_keep", "rows_weight",
                                    "cols_first", "cols_second", "cols_keep", "cols_weight"};
    const int dimensions[10] = {2, 3, 1, 1, 1, 1, 1, 1, 1, 1};
    const Py_ssize_t sizes[10] = {1, sizeof(float), sizeof(Py_ssize_t), sizeof(Py_ssize_t), sizeof(float),
                                  sizeof(float), sizeof(Py_ssize_t), sizeof(Py_ssize_t), sizeof(float),
                                  sizeof(float)};
    Py_buffer views[10];
    int taken = 0;
    PyObject *result = NULL;
    uint8_t *scratch = NULL;
    Py_ssize_t *spans = NULL;
    Taps rows, cols;
    for (; taken < 10; taken++) {
        if (take_buffer(objects[taken], &views[taken], dimensions[taken], sizes[taken], taken == 0,
                        names[taken]) < 0) {
            goto done;
        }
    }
    const Py_ssize_t source_h = views[1].shape[0], source_w = views[1].shape[1], classes = views[1].shape[2];
    if (source_h < 1 || source_w < 1 || classes < 1 || classes > 256) {
        PyErr_SetString(PyExc_ValueError, "logits must be at least 1 x 1 x 1, with at most 256 classes");
        goto done;
    }
    rows.out = views[0].shape[0];
    rows.source = source_h;
    cols.out = views[0].shape[1];
    cols.source = source_w;
    if (check_taps(&rows, &views[2], "row") < 0 || check_taps(&cols, &views[6], "column") < 0) {
        goto done;
    }
    scratch = PyMem_Malloc((size_t)(2 * source_h * source_w));
    spans = PyMem_Calloc((size_t)(2 * source_w), sizeof(Py_ssize_t));
    if (scratch == NULL || spans == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* The output columns whose first tap is each source column: one span each, as the firsts never decrease. */
    for (Py_ssize_t x = cols.out - 1; x >= 0; x--) {
        spans[cols.first[x]] = x;
    }
    for (Py_ssize_t x = 0; x < cols.out; x++) {
        spans[source_w + cols.first[x]] = x + 1;
    }
    Py_BEGIN_ALLOW_THREADS
    classify_cells(views[1].buf, source_h, source_w, classes, everywhere, margin, scratch,
                   scratch + source_h * source_w);
    fill(views[0].buf, views[1].buf, source_w, classes, scratch, scratch + source_h * source_w, &rows, &cols,
         spans, spans + source_w);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(scratch);
    PyMem_Free(spans);
    while (taken-- > 0) {
        PyBuffer_Release(&views[taken]);
    }
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
