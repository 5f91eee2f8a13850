/* A RECORDING STAND-IN for librknnrt.so, built by tests/runtime/test_rknnrt.py with gcc.
 *
 * It is not Rockchip's runtime: it has the C signatures and structure layouts of the public
 * rknn_api.h, records every call (name, arguments, structure contents) as one line in the file
 * named by $STANDIN_LOG, and returns known outputs. Its "model" is a text description:
 *
 *   in NAME d0,d1,...      an input (fp16 in the model; a dimension T is the dynamic row count)
 *   out NAME d0,d1,...     an output
 *   fail FUNCTION          that function fails (returns -1, or NULL for rknn_create_mem)
 *   say TEXT...            rknn_init prints "E RKNN: TEXT" on stderr, as the real runtime logs
 *   init CODE              rknn_init then returns CODE (after making a context, which the
 *                          caller must destroy)
 *   mangle NAME HOW [IO]   output NAME comes out wrong: transpose (its last two dimensions, or
 *                          [4, n/4] for a vector), scale (x2) or zero; with IO (copy or
 *                          zero-copy) only on that io path
 *   replay NAME ROWS PATH  output NAME at ROWS rows (0: any) is the float32 values of file PATH
 *
 * rknn_run writes out_j[i] = 1000 * (j + 1) + in_0[i % n_0] + 10 * in_1[i % n_1] (the inputs
 * that exist), reading and writing float32 only where the bound attribute says float32. Inputs
 * come from buffers bound with rknn_set_io_mem (zero-copy) or set with rknn_inputs_set (copy);
 * outputs go to bound buffers and are kept for rknn_outputs_get.
 *
 * Its version string is librknnrt's form; compile with -DSTANDIN_VERSION='"1.3.4"' for another.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t rknn_context;

typedef struct { uint32_t n_input, n_output; } rknn_input_output_num;

typedef struct {
    uint32_t index, n_dims, dims[16];
    char name[256];
    uint32_t n_elems, size;
    int fmt, type, qnt_type;
    int8_t fl;
    int32_t zp;
    float scale;
    uint32_t w_stride, size_with_stride;
    uint8_t pass_through;
    uint32_t h_stride;
} rknn_tensor_attr;

typedef struct {
    void *virt_addr;
    uint64_t phys_addr;
    int32_t fd, offset;
    uint32_t size, flags;
    void *priv_data;
} rknn_tensor_mem;

typedef struct { char api_version[256], drv_version[256]; } rknn_sdk_version;

typedef struct {
    uint32_t index;
    void *buf;
    uint32_t size;
    uint8_t pass_through;
    int type, fmt;
} rknn_input;

typedef struct {
    uint8_t want_float, is_prealloc;
    uint32_t index;
    void *buf;
    uint32_t size;
} rknn_output;

#ifndef STANDIN_VERSION
#define STANDIN_VERSION "2.5.0"
#endif
/* where `strings` (and rwkv2rknn's version reader) find it in the real library */
const char standin_version[] = "librknnrt version: " STANDIN_VERSION " (620b20d build@2025-04-01T10:00:00)";

#define MAXT 16
typedef struct {
    char name[256];
    int n_dims, dims[16];  /* -1: the dynamic row count */
    rknn_tensor_mem *mem;
    rknn_tensor_attr bound;
    float *data;            /* copy path: an input as set, an output as last computed */
    uint32_t n_data;
    char mangle[16], mangle_io[16];
    int replay_rows;
    char replay[512];
} tensor;

typedef struct {
    int used, n_in, n_out, rows, dynamic, init_code;
    tensor t[2][MAXT];
    char fail[256];
} model;

static model models[8];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...) {
    const char *path = getenv("STANDIN_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static model *get(rknn_context ctx) {
    if (ctx < 100 || ctx >= 108 || !models[ctx - 100].used) return NULL;
    return &models[ctx - 100];
}

static int fails(model *m, const char *fn) { return m && strcmp(m->fail, fn) == 0; }

static uint32_t elems(tensor *t, int rows) {
    uint32_t n = 1;
    for (int d = 0; d < t->n_dims; d++) n *= t->dims[d] < 0 ? (uint32_t)rows : (uint32_t)t->dims[d];
    return n;
}

static void dims_str(char *out, const uint32_t *dims, uint32_t n) {
    out[0] = 0;
    for (uint32_t d = 0; d < n && d < 16; d++)
        sprintf(out + strlen(out), d ? ",%u" : "%u", dims[d]);
}

static void say_attr(const char *fn, rknn_context ctx, const rknn_tensor_attr *a, const char *extra) {
    char dims[200];
    dims_str(dims, a->dims, a->n_dims);
    say("%s ctx=%llu index=%u n_dims=%u dims=%s name=%s n_elems=%u size=%u fmt=%d type=%d "
        "pass_through=%u%s", fn, (unsigned long long)ctx, a->index, a->n_dims, dims, a->name,
        a->n_elems, a->size, a->fmt, a->type, a->pass_through, extra);
}

int rknn_init(rknn_context *ctx, void *data, uint32_t size, uint32_t flag, void *extend) {
    say("rknn_init size=%u flag=%u extend=%s", size, flag, extend ? "set" : "null");
    int slot = 0;
    while (slot < 8 && models[slot].used) slot++;
    if (slot == 8) return -4;
    model *m = &models[slot];
    memset(m, 0, sizeof(*m));
    char *text = calloc(size + 1, 1), *save = NULL;
    memcpy(text, data, size);
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char kind[8] = {0}, name[256] = {0}, dims[256] = {0}, path[512] = {0};
        if (strncmp(line, "say ", 4) == 0) { fprintf(stderr, "E RKNN: %s\n", line + 4); continue; }
        if (sscanf(line, "%7s %255s %255s %511s", kind, name, dims, path) < 2) continue;
        if (strcmp(kind, "fail") == 0) { snprintf(m->fail, sizeof(m->fail), "%s", name); continue; }
        if (strcmp(kind, "init") == 0) { m->init_code = atoi(name); continue; }
        if (strcmp(kind, "mangle") == 0 || strcmp(kind, "replay") == 0) {
            for (int j = 0; j < m->n_out; j++)
                if (strcmp(m->t[1][j].name, name) == 0) {
                    if (kind[0] == 'm') {
                        snprintf(m->t[1][j].mangle, 16, "%.15s", dims);
                        snprintf(m->t[1][j].mangle_io, 16, "%.15s", path);
                    }
                    else { m->t[1][j].replay_rows = atoi(dims); snprintf(m->t[1][j].replay, 512, "%.511s", path); }
                }
            continue;
        }
        int side = strcmp(kind, "out") == 0;
        tensor *t = &m->t[side][side ? m->n_out++ : m->n_in++];
        snprintf(t->name, sizeof(t->name), "%s", name);
        for (char *d = strtok(dims, ","); d; d = strtok(NULL, ","))
            t->dims[t->n_dims++] = (d[0] == 'T') ? (m->dynamic = 1, -1) : atoi(d);
    }
    free(text);
    fflush(stderr);
    if (fails(m, "rknn_init") || m->n_in == 0) return -6;
    m->used = 1;
    m->rows = 1;
    *ctx = 100 + slot;
    return m->init_code;
}

int rknn_destroy(rknn_context ctx) {
    say("rknn_destroy ctx=%llu", (unsigned long long)ctx);
    model *m = get(ctx);
    if (!m) return -7;
    for (int side = 0; side < 2; side++)
        for (int i = 0; i < MAXT; i++) free(m->t[side][i].data);
    m->used = 0;
    return 0;
}

int rknn_set_core_mask(rknn_context ctx, int mask) {
    say("rknn_set_core_mask ctx=%llu mask=%d", (unsigned long long)ctx, mask);
    model *m = get(ctx);
    return !m ? -7 : fails(m, "rknn_set_core_mask") ? -1 : 0;
}

static void fill(model *m, tensor *t, rknn_tensor_attr *a, int current) {
    uint32_t index = a->index;
    memset(a, 0, sizeof(*a));
    a->index = index;
    a->n_dims = t->n_dims;
    int rows = current ? m->rows : 1;
    for (int d = 0; d < t->n_dims; d++) a->dims[d] = t->dims[d] < 0 ? (uint32_t)rows : (uint32_t)t->dims[d];
    snprintf(a->name, sizeof(a->name), "%s", t->name);
    a->n_elems = elems(t, rows);
    a->size = a->n_elems * 2; /* fp16 in the model */
    a->fmt = 3;               /* RKNN_TENSOR_UNDEFINED */
    a->type = 1;              /* RKNN_TENSOR_FLOAT16 */
}

int rknn_query(rknn_context ctx, int cmd, void *info, uint32_t size) {
    model *m = get(ctx);
    say("rknn_query ctx=%llu cmd=%d size=%u index=%u", (unsigned long long)ctx, cmd, size,
        (cmd == 1 || cmd == 2 || cmd == 14 || cmd == 15) ? ((rknn_tensor_attr *)info)->index : 0);
    if (!m) return -7;
    if (fails(m, "rknn_query")) return -1;
    if (cmd == 0) {
        if (size != sizeof(rknn_input_output_num)) return -5;
        ((rknn_input_output_num *)info)->n_input = m->n_in;
        ((rknn_input_output_num *)info)->n_output = m->n_out;
        return 0;
    }
    if (cmd == 1 || cmd == 2 || cmd == 14 || cmd == 15) {
        if (size != sizeof(rknn_tensor_attr)) return -5;
        rknn_tensor_attr *a = info;
        int side = (cmd == 2 || cmd == 15);
        if (a->index >= (uint32_t)(side ? m->n_out : m->n_in)) return -5;
        fill(m, &m->t[side][a->index], a, cmd >= 14);
        return 0;
    }
    if (cmd == 5) {
        if (size != sizeof(rknn_sdk_version)) return -5;
        snprintf(((rknn_sdk_version *)info)->api_version, 256, "%s", standin_version + 19);
        snprintf(((rknn_sdk_version *)info)->drv_version, 256, "0.9.8");
        return 0;
    }
    return -5;
}

rknn_tensor_mem *rknn_create_mem(rknn_context ctx, uint32_t size) {
    say("rknn_create_mem ctx=%llu size=%u", (unsigned long long)ctx, size);
    model *m = get(ctx);
    if (!m || fails(m, "rknn_create_mem")) return NULL;
    rknn_tensor_mem *mem = calloc(1, sizeof(*mem));
    mem->virt_addr = calloc(size, 1);
    mem->size = size;
    mem->fd = -1;
    return mem;
}

int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem *mem) {
    say("rknn_destroy_mem ctx=%llu size=%u", (unsigned long long)ctx, mem ? mem->size : 0);
    if (!mem) return -5;
    free(mem->virt_addr);
    free(mem);
    return 0;
}

int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr) {
    char extra[64];
    snprintf(extra, sizeof(extra), " mem_size=%u", mem ? mem->size : 0);
    say_attr("rknn_set_io_mem", ctx, attr, extra);
    model *m = get(ctx);
    if (!m) return -7;
    if (fails(m, "rknn_set_io_mem") || !mem || mem->size < attr->size) return -1;
    for (int side = 0; side < 2; side++)
        for (int i = 0; i < (side ? m->n_out : m->n_in); i++)
            if (strcmp(m->t[side][i].name, attr->name) == 0 && (uint32_t)i == attr->index) {
                m->t[side][i].mem = mem;
                m->t[side][i].bound = *attr;
                return 0;
            }
    return -5;
}

int rknn_set_input_shapes(rknn_context ctx, uint32_t n, rknn_tensor_attr attrs[]) {
    say("rknn_set_input_shapes ctx=%llu n=%u", (unsigned long long)ctx, n);
    model *m = get(ctx);
    if (!m) return -7;
    if (!m->dynamic || n != (uint32_t)m->n_in) return -5;
    for (uint32_t i = 0; i < n; i++) {
        say_attr("  shape", ctx, &attrs[i], "");
        tensor *t = &m->t[0][i];
        if (attrs[i].n_dims != (uint32_t)t->n_dims) return -5;
        for (int d = 0; d < t->n_dims; d++) {
            if (t->dims[d] < 0) m->rows = attrs[i].dims[d];
            else if (attrs[i].dims[d] != (uint32_t)t->dims[d]) return -5;
        }
    }
    for (int side = 0; side < 2; side++)
        for (int i = 0; i < (side ? m->n_out : m->n_in); i++) m->t[side][i].mem = NULL;
    return 0;
}

static void mangle(tensor *t, float *v, uint32_t n) {
    if (strcmp(t->mangle, "scale") == 0) for (uint32_t i = 0; i < n; i++) v[i] *= 2;
    if (strcmp(t->mangle, "zero") == 0) memset(v, 0, n * sizeof(float));
    if (strcmp(t->mangle, "transpose") == 0) {
        uint32_t a = 4, b = n / 4;
        uint32_t nd = t->bound.n_dims ? t->bound.n_dims : 0;
        if (nd >= 2 && t->bound.dims[nd - 1] > 1 && t->bound.dims[nd - 2] > 1) {
            a = t->bound.dims[nd - 2];
            b = t->bound.dims[nd - 1];
        }
        float *c = malloc(n * sizeof(float));
        memcpy(c, v, n * sizeof(float));
        for (uint32_t rest = 0; rest + a * b <= n; rest += a * b)
            for (uint32_t i = 0; i < a; i++)
                for (uint32_t j = 0; j < b; j++) v[rest + j * a + i] = c[rest + i * b + j];
        free(c);
    }
}

int rknn_run(rknn_context ctx, void *extend) {
    say("rknn_run ctx=%llu extend=%s", (unsigned long long)ctx, extend ? "set" : "null");
    model *m = get(ctx);
    if (!m) return -7;
    if (fails(m, "rknn_run")) return -1;
    float *in[2] = {NULL, NULL};
    uint32_t n[2] = {1, 1};
    for (int i = 0; i < m->n_in; i++) {
        tensor *t = &m->t[0][i];
        float *src = NULL;
        uint32_t got = 0;
        if (t->mem && t->bound.type == 0) { src = t->mem->virt_addr; got = t->bound.n_elems; }
        else if (t->data) { src = t->data; got = t->n_data; }
        if (!src || got != elems(t, m->rows)) return -8;
        if (i < 2) { in[i] = src; n[i] = got; }
    }
    for (int j = 0; j < m->n_out; j++) {
        tensor *t = &m->t[1][j];
        uint32_t ne = elems(t, m->rows);
        if (t->mem && (t->bound.type != 0 || t->bound.n_elems != ne)) return -9;
        free(t->data);
        t->data = calloc(ne, sizeof(float));
        t->n_data = ne;
        float *out = t->data;
        FILE *f = (t->replay[0] && (t->replay_rows == 0 || t->replay_rows == m->rows)) ? fopen(t->replay, "rb") : NULL;
        if (f) {
            size_t r = fread(out, sizeof(float), ne, f);
            fclose(f);
            if (r != ne) return -9;
        } else {
            for (uint32_t i = 0; i < ne; i++)
                out[i] = 1000.0f * (j + 1) + (in[0] ? in[0][i % n[0]] : 0) + (in[1] ? 10 * in[1][i % n[1]] : 0);
        }
        if (!t->mem) {  /* the shape a copy-path caller sees */
            t->bound.n_dims = t->n_dims;
            for (int d = 0; d < t->n_dims; d++) t->bound.dims[d] = t->dims[d] < 0 ? (uint32_t)m->rows : (uint32_t)t->dims[d];
        }
        const char *io = t->mem ? "zero-copy" : "copy";
        if (!t->mangle_io[0] || strcmp(t->mangle_io, io) == 0) mangle(t, out, ne);
        if (t->mem) memcpy(t->mem->virt_addr, out, ne * sizeof(float));
    }
    return 0;
}

int rknn_inputs_set(rknn_context ctx, uint32_t n, rknn_input inputs[]) {
    say("rknn_inputs_set ctx=%llu n=%u", (unsigned long long)ctx, n);
    model *m = get(ctx);
    if (!m) return -7;
    if (fails(m, "rknn_inputs_set")) return -1;
    if (n != (uint32_t)m->n_in) return -5;
    for (uint32_t k = 0; k < n; k++) {
        rknn_input *x = &inputs[k];
        say("  input index=%u size=%u pass_through=%u type=%d fmt=%d", x->index, x->size,
            x->pass_through, x->type, x->fmt);
        if (x->index >= (uint32_t)m->n_in || !x->buf) return -5;
        tensor *t = &m->t[0][x->index];
        uint32_t ne = elems(t, m->rows);
        /* the runtime converts FLOAT32 when pass_through is 0; this stand-in takes only that */
        if (x->type != 0 || x->pass_through != 0 || x->size != ne * 4) return -8;
        free(t->data);
        t->data = malloc(x->size);
        memcpy(t->data, x->buf, x->size);
        t->n_data = ne;
        t->mem = NULL;  /* set inputs replace bound ones */
    }
    return 0;
}

int rknn_outputs_get(rknn_context ctx, uint32_t n, rknn_output outputs[], void *extend) {
    say("rknn_outputs_get ctx=%llu n=%u extend=%s", (unsigned long long)ctx, n, extend ? "set" : "null");
    model *m = get(ctx);
    if (!m) return -7;
    if (fails(m, "rknn_outputs_get")) return -1;
    if (n != (uint32_t)m->n_out) return -5;
    for (uint32_t k = 0; k < n; k++) {
        rknn_output *o = &outputs[k];
        say("  output index=%u want_float=%u is_prealloc=%u size=%u", o->index, o->want_float,
            o->is_prealloc, o->size);
        if (o->index >= (uint32_t)m->n_out) return -5;
        tensor *t = &m->t[1][o->index];
        if (!t->data || !o->want_float) return -9;
        uint32_t bytes = t->n_data * 4;
        if (o->is_prealloc) {
            if (!o->buf || o->size < bytes) return -9;
        } else {
            o->buf = malloc(bytes);
            o->size = bytes;
        }
        memcpy(o->buf, t->data, bytes);
    }
    return 0;
}

int rknn_outputs_release(rknn_context ctx, uint32_t n, rknn_output outputs[]) {
    say("rknn_outputs_release ctx=%llu n=%u", (unsigned long long)ctx, n);
    model *m = get(ctx);
    if (!m) return -7;
    for (uint32_t k = 0; k < n; k++)
        if (!outputs[k].is_prealloc) { free(outputs[k].buf); outputs[k].buf = NULL; }
    return 0;
}

/* The compiler's layout of the structures above, for the test to compare with ctypes'. */
void standin_layout(uint32_t *out) {
    uint32_t v[] = {
        sizeof(rknn_tensor_attr), offsetof(rknn_tensor_attr, n_dims), offsetof(rknn_tensor_attr, dims),
        offsetof(rknn_tensor_attr, name), offsetof(rknn_tensor_attr, n_elems),
        offsetof(rknn_tensor_attr, size), offsetof(rknn_tensor_attr, fmt),
        offsetof(rknn_tensor_attr, type), offsetof(rknn_tensor_attr, qnt_type),
        offsetof(rknn_tensor_attr, fl), offsetof(rknn_tensor_attr, zp),
        offsetof(rknn_tensor_attr, scale), offsetof(rknn_tensor_attr, w_stride),
        offsetof(rknn_tensor_attr, size_with_stride), offsetof(rknn_tensor_attr, pass_through),
        offsetof(rknn_tensor_attr, h_stride),
        sizeof(rknn_tensor_mem), offsetof(rknn_tensor_mem, phys_addr), offsetof(rknn_tensor_mem, fd),
        offsetof(rknn_tensor_mem, offset), offsetof(rknn_tensor_mem, size),
        offsetof(rknn_tensor_mem, flags), offsetof(rknn_tensor_mem, priv_data),
        sizeof(rknn_input_output_num), sizeof(rknn_sdk_version),
        sizeof(rknn_input), offsetof(rknn_input, buf), offsetof(rknn_input, size),
        offsetof(rknn_input, pass_through), offsetof(rknn_input, type), offsetof(rknn_input, fmt),
        sizeof(rknn_output), offsetof(rknn_output, is_prealloc), offsetof(rknn_output, index),
        offsetof(rknn_output, buf), offsetof(rknn_output, size)};
    memcpy(out, v, sizeof(v));
}
