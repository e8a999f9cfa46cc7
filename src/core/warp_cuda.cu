/* warp_cuda.cu — the warp kernel on a CUDA GPU (built when nvcc is found).
 *
 * One thread per output pixel runs exactly the arithmetic of the CPU kernel
 * (warp_math.h: coordinates in double, weights in float, sums in float for
 * the integer types and in double, zero-weight taps left out, for float32;
 * no fused multiply-adds), so both give the same bytes.  A context belongs to one
 * worker thread: it holds a stream, device buffers that grow to the largest
 * tile seen, and the field grids uploaded once per grid id (ids are unique in
 * the process, so a cached grid is never stale).  Every CUDA failure becomes
 * SF_EDEVICE with CUDA's message; nothing here exits. */
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "scopefs/warp.h"
}
#include "warp_math.h"

#define GRID_SLOTS 8

struct grid_slot {
	uint64_t id; /* 0: empty */
	float *dev;
};

struct sf_warp_cuda {
	int device;
	cudaStream_t stream;
	void *src;      /* device copy of the source rect, rows packed */
	size_t src_cap; /* bytes */
	void *dst;
	size_t dst_cap;
	struct grid_slot grids[GRID_SLOTS];
	unsigned next_slot; /* round-robin eviction */
};

static int cuda_fail(sf_err *e, cudaError_t err, const char *what)
{
	return sf_fail(e, SF_EDEVICE, "gpu: %s: %s", what, cudaGetErrorString(err));
}

/* --- device side ---------------------------------------------------------- */

template <typename T> struct sample_traits;
/* blend: the bilinear blend of the type (warp_math.h; float32 has its own);
 * acc: the type of a bicubic row sum and dot4 the sum itself. */
template <> struct sample_traits<uint8_t> {
	typedef float acc;
	static __device__ float blend(float a, float b, float c, float d, float tx, float ty)
	{
		return wm_bilinear(a, b, c, d, tx, ty);
	}
	static __device__ float dot4(const float w[4], float a, float b, float c, float d)
	{
		return wm_dot4(w, a, b, c, d);
	}
	static __device__ uint8_t store(float v)
	{
		return (uint8_t)wm_round_clamp(v, 255.0f);
	}
};
template <> struct sample_traits<uint16_t> {
	typedef float acc;
	static __device__ float blend(float a, float b, float c, float d, float tx, float ty)
	{
		return wm_bilinear(a, b, c, d, tx, ty);
	}
	static __device__ float dot4(const float w[4], float a, float b, float c, float d)
	{
		return wm_dot4(w, a, b, c, d);
	}
	static __device__ uint16_t store(float v)
	{
		return (uint16_t)wm_round_clamp(v, 65535.0f);
	}
};
template <> struct sample_traits<float> {
	typedef double acc;
	static __device__ float blend(float a, float b, float c, float d, float tx, float ty)
	{
		return wm_bilinear_f32(a, b, c, d, tx, ty);
	}
	static __device__ double dot4(const float w[4], double a, double b, double c, double d)
	{
		const double wd[4] = {(double)w[0], (double)w[1], (double)w[2], (double)w[3]};
		return wm_dot4_d(wd, a, b, c, d);
	}
	static __device__ float store(float v)
	{
		return v;
	}
};

struct warp_args {
	sf_map map; /* field value pointers point to device memory */
	const uint8_t *src;
	size_t src_stride;
	int64_t sw, sh; /* source buffer size */
	double ox, oy;  /* minus the source rect origin */
	int64_t out_x, out_y, out_w, out_h;
	uint8_t *dst;
	size_t dst_stride;
	unsigned spp;
	int interp;
	float bgf;
};

template <typename T> __device__ float tap(const warp_args &a, int64_t x, int64_t y, unsigned c)
{
	if (x < 0 || x >= a.sw || y < 0 || y >= a.sh)
		return a.bgf;
	return (float)((const T *)(a.src + (size_t)y * a.src_stride))[(size_t)x * a.spp + c];
}

template <typename T> __device__ void warp_pixel(const warp_args &a)
{
	int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
	int64_t j = (int64_t)blockIdx.y * blockDim.y + threadIdx.y;
	if (i >= a.out_w || j >= a.out_h)
		return;
	double sx, sy;
	wm_map_point(&a.map, (double)(a.out_x + i), (double)(a.out_y + j), &sx, &sy);
	double x = WM_DADD(sx, a.ox), y = WM_DADD(sy, a.oy);
	T *o = (T *)(a.dst + (size_t)j * a.dst_stride) + (size_t)i * a.spp;
	T bg = sample_traits<T>::store(a.bgf);
	if (a.interp == SF_INTERP_NEAREST) {
		double fx = floor(WM_DADD(x, 0.5)), fy = floor(WM_DADD(y, 0.5));
		int in = fx >= 0.0 && fx < (double)a.sw && fy >= 0.0 && fy < (double)a.sh;
		const T *p =
		    in ? (const T *)(a.src + (size_t)fy * a.src_stride) + (size_t)fx * a.spp : NULL;
		for (unsigned c = 0; c < a.spp; c++)
			o[c] = in ? p[c] : bg;
		return;
	}
	if (a.interp == SF_INTERP_BILINEAR) {
		if (wm_bilinear_outside(x, y, a.sw, a.sh)) {
			for (unsigned c = 0; c < a.spp; c++)
				o[c] = bg;
			return;
		}
		double fx = floor(x), fy = floor(y);
		float tx = (float)WM_DADD(x, -fx), ty = (float)WM_DADD(y, -fy);
		int64_t x0 = (int64_t)fx, y0 = (int64_t)fy;
		for (unsigned c = 0; c < a.spp; c++)
			o[c] = sample_traits<T>::store(sample_traits<T>::blend(
			    tap<T>(a, x0, y0, c), tap<T>(a, x0 + 1, y0, c),
			    tap<T>(a, x0, y0 + 1, c), tap<T>(a, x0 + 1, y0 + 1, c), tx, ty));
		return;
	}
	if (wm_bicubic_outside(x, y, a.sw, a.sh)) {
		for (unsigned c = 0; c < a.spp; c++)
			o[c] = bg;
		return;
	}
	double fx = floor(x), fy = floor(y);
	float wx[4], wy[4];
	wm_cubic_weights((float)WM_DADD(x, -fx), wx);
	wm_cubic_weights((float)WM_DADD(y, -fy), wy);
	int64_t x0 = (int64_t)fx - 1, y0 = (int64_t)fy - 1;
	for (unsigned c = 0; c < a.spp; c++) {
		typename sample_traits<T>::acc r[4];
		for (int k = 0; k < 4; k++)
			r[k] = sample_traits<T>::dot4(
			    wx, tap<T>(a, x0, y0 + k, c), tap<T>(a, x0 + 1, y0 + k, c),
			    tap<T>(a, x0 + 2, y0 + k, c), tap<T>(a, x0 + 3, y0 + k, c));
		o[c] = sample_traits<T>::store(
		    (float)sample_traits<T>::dot4(wy, r[0], r[1], r[2], r[3]));
	}
}

/* One kernel per sample type. */
__global__ void warp_u8(warp_args a)
{
	warp_pixel<uint8_t>(a);
}

__global__ void warp_u16(warp_args a)
{
	warp_pixel<uint16_t>(a);
}

__global__ void warp_f32(warp_args a)
{
	warp_pixel<float>(a);
}

/* --- host side ------------------------------------------------------------ */

extern "C" int sf_warp_cuda_create(int device, sf_warp_cuda **out, sf_err *e)
{
	*out = NULL;
	int n = 0;
	cudaError_t err = cudaGetDeviceCount(&n);
	if (err != cudaSuccess)
		return sf_fail(e, SF_EDEVICE, "gpu %d: no CUDA device: %s", device,
		               cudaGetErrorString(err));
	if (device < 0 || device >= n)
		return sf_fail(e, SF_EDEVICE, "gpu %d: no such CUDA device (%d found)", device, n);
	sf_warp_cuda *c = (sf_warp_cuda *)calloc(1, sizeof *c);
	if (!c)
		return sf_fail(e, SF_ENOMEM, "gpu %d: out of memory", device);
	c->device = device;
	if ((err = cudaSetDevice(device)) != cudaSuccess ||
	    (err = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess) {
		free(c);
		return cuda_fail(e, err, "create stream");
	}
	*out = c;
	return SF_OK;
}

extern "C" void sf_warp_cuda_destroy(sf_warp_cuda *c)
{
	if (!c)
		return;
	cudaSetDevice(c->device);
	cudaStreamSynchronize(c->stream);
	for (unsigned i = 0; i < GRID_SLOTS; i++)
		cudaFree(c->grids[i].dev);
	cudaFree(c->src);
	cudaFree(c->dst);
	cudaStreamDestroy(c->stream);
	free(c);
}

/* Make *buf hold at least bytes. */
static int ensure(void **buf, size_t *cap, size_t bytes, sf_err *e)
{
	if (*cap >= bytes)
		return SF_OK;
	cudaFree(*buf);
	*buf = NULL;
	*cap = 0;
	cudaError_t err = cudaMalloc(buf, bytes ? bytes : 1);
	if (err != cudaSuccess)
		return cuda_fail(e, err, "allocate tile buffer");
	*cap = bytes;
	return SF_OK;
}

/* The device copy of field f's grid, uploaded on first use. */
static int device_grid(sf_warp_cuda *c, const sf_field_step *f, float **dev, sf_err *e)
{
	for (unsigned i = 0; i < GRID_SLOTS; i++) {
		if (c->grids[i].id == f->grid_id && c->grids[i].dev) {
			*dev = c->grids[i].dev;
			return SF_OK;
		}
	}
	struct grid_slot *s = &c->grids[c->next_slot++ % GRID_SLOTS];
	cudaStreamSynchronize(c->stream); /* the slot's old grid may be in use */
	cudaFree(s->dev);
	s->dev = NULL;
	s->id = 0;
	size_t bytes = 2 * (size_t)f->w * f->h * sizeof(float);
	cudaError_t err = cudaMalloc((void **)&s->dev, bytes);
	if (err == cudaSuccess)
		err = cudaMemcpy(s->dev, f->v, bytes, cudaMemcpyHostToDevice);
	if (err != cudaSuccess) {
		cudaFree(s->dev);
		s->dev = NULL;
		return cuda_fail(e, err, "upload displacement field");
	}
	s->id = f->grid_id;
	*dev = s->dev;
	return SF_OK;
}

extern "C" int sf_warp_tile_cuda(sf_warp_cuda *c, const sf_map *m, const sf_warp_src *src,
                                 const sf_warp_fmt *fmt, sf_wrect out, void *dst, size_t dst_stride,
                                 sf_err *e)
{
	size_t bytes = sf_dtype_bytes(fmt->dtype);
	if (!c)
		return sf_fail(e, SF_EINVAL, "gpu: no context");
	if (bytes == 0 || fmt->samples < 1 || fmt->samples > 64 ||
	    (unsigned)fmt->interp > SF_INTERP_BICUBIC || out.w < 0 || out.h < 0 ||
	    out.w > (1 << 20) || out.h > (1 << 20) || src->rect.w < 0 || src->rect.h < 0)
		return sf_fail(e, SF_EINVAL, "gpu warp: bad format or rect");
	if (out.w == 0 || out.h == 0)
		return SF_OK;
	size_t px = bytes * fmt->samples;
	if (dst_stride < px * (size_t)out.w ||
	    (src->rect.w > 0 && src->rect.h > 0 && src->stride < px * (size_t)src->rect.w))
		return sf_fail(e, SF_EINVAL, "gpu warp: buffer stride");
	cudaError_t err = cudaSetDevice(c->device);
	if (err != cudaSuccess)
		return cuda_fail(e, err, "select device");
	warp_args a;
	memset(&a, 0, sizeof a);
	a.map = *m;
	for (unsigned k = 0; k < m->nfields; k++) {
		float *dev = NULL;
		int rc = device_grid(c, &m->field[k], &dev, e);
		if (rc != SF_OK)
			return rc;
		a.map.field[k].v = dev;
	}
	int64_t sw = src->rect.w, sh = src->rect.h;
	if (sw == 0 || sh == 0)
		sw = sh = 0;
	size_t src_row = px * (size_t)sw, out_row = px * (size_t)out.w;
	int rc = ensure(&c->src, &c->src_cap, src_row * (size_t)sh, e);
	if (rc == SF_OK)
		rc = ensure(&c->dst, &c->dst_cap, out_row * (size_t)out.h, e);
	if (rc != SF_OK)
		return rc;
	if (sw > 0 &&
	    (err = cudaMemcpy2DAsync(c->src, src_row, src->pixels, src->stride, src_row, (size_t)sh,
	                             cudaMemcpyHostToDevice, c->stream)) != cudaSuccess)
		return cuda_fail(e, err, "upload source");
	a.src = (const uint8_t *)c->src;
	a.src_stride = src_row;
	a.sw = sw;
	a.sh = sh;
	a.ox = -(double)src->rect.x;
	a.oy = -(double)src->rect.y;
	a.out_x = out.x;
	a.out_y = out.y;
	a.out_w = out.w;
	a.out_h = out.h;
	a.dst = (uint8_t *)c->dst;
	a.dst_stride = out_row;
	a.spp = fmt->samples;
	a.interp = fmt->interp;
	/* the background in the sample type, as warp.c converts it */
	double b = isfinite(fmt->background) ? fmt->background : 0.0;
	if (fmt->dtype == SF_U8)
		a.bgf = (float)wm_round_clamp((float)fmax(fmin(b, 1e6), -1.0), 255.0f);
	else if (fmt->dtype == SF_U16)
		a.bgf = (float)wm_round_clamp((float)fmax(fmin(b, 1e6), -1.0), 65535.0f);
	else
		a.bgf = (float)b;
	dim3 block(32, 8);
	dim3 grid((unsigned)((out.w + 31) / 32), (unsigned)((out.h + 7) / 8));
	switch (fmt->dtype) {
	case SF_U8: warp_u8<<<grid, block, 0, c->stream>>>(a); break;
	case SF_U16: warp_u16<<<grid, block, 0, c->stream>>>(a); break;
	case SF_F32: warp_f32<<<grid, block, 0, c->stream>>>(a); break;
	}
	if ((err = cudaGetLastError()) != cudaSuccess)
		return cuda_fail(e, err, "launch warp kernel");
	if ((err = cudaMemcpy2DAsync(dst, dst_stride, c->dst, out_row, out_row, (size_t)out.h,
	                             cudaMemcpyDeviceToHost, c->stream)) != cudaSuccess ||
	    (err = cudaStreamSynchronize(c->stream)) != cudaSuccess)
		return cuda_fail(e, err, "warp");
	return SF_OK;
}
