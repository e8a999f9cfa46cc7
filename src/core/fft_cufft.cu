/* fft_cufft.cu — the GPU engine of fft.h: cuFFT R2C/C2R plus CUDA kernels
 * for the Richardson-Lucy steps, so a block's iterations never leave the
 * device (the host sees the block only at upload and download).
 *
 * Invariants: every plan owns one stream; every transform, kernel and copy of
 * that plan is queued on it in program order, so no other synchronisation is
 * needed between steps; download, norm2 and ba_step synchronise the stream
 * before they hand results to the host.  Per-plan device scratch (Gaussian taps, the norm
 * accumulator) keeps plans on the same device independent of each other, so
 * one worker thread per plan needs no lock.  Any CUDA or cuFFT failure,
 * including out of memory, is SF_EDEVICE with the library's message: the
 * caller falls back to the FFTW engine. */
extern "C" {
#include "scopefs/err.h"
}
#include "scopefs/fft.h"

#include <cuda_runtime.h>
#include <cufft.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TAPS    1025
#define MAX_BLOCKS  1024       /* reduction grids: enough blocks to fill the GPU */
#define STAGE_BYTES (8u << 20) /* one pinned staging buffer; a plan has two */

struct sf_fft_plan {
	size_t nz, ny, nx;    /* real shape */
	size_t nreal, ncplx;  /* element counts */
	int device;           /* CUDA ordinal */
	cufftHandle r2c, c2r; /* 0 when not made */
	int have_r2c, have_c2r;
	cudaStream_t stream; /* every operation of this plan */
	float *taps;         /* device, MAX_TAPS Gaussian weights */
	double *acc;         /* device, one double for norm2 */
	double *part;        /* device, 2 * MAX_BLOCKS per-block sums of ba_step */
	/* Host-device copies go through two pinned buffers in turn: while the
	 * DMA engine moves one chunk, the host copies the next into the other
	 * (pageable copies would be staged by the driver one chunk at a time). */
	void *stage[2];          /* pinned host, STAGE_BYTES each */
	cudaEvent_t stage_ev[2]; /* the last copy from or to stage[i] is done */
	int have_ev[2];
};

static int cuda_fail(sf_err *e, cudaError_t err, const char *what)
{
	return sf_fail(e, SF_EDEVICE, "cuda: %s: %s", what, cudaGetErrorString(err));
}

static int cufft_fail(sf_err *e, cufftResult r, const char *what)
{
	return sf_fail(e, SF_EDEVICE, "cufft: %s: error %d", what, (int)r);
}

/* After a kernel launch: report a bad launch configuration or earlier fault. */
static int launched(sf_err *e, const char *what)
{
	cudaError_t err = cudaGetLastError();
	return err == cudaSuccess ? SF_OK : cuda_fail(e, err, what);
}

static unsigned grid_for(size_t n)
{
	size_t blocks = (n + 255) / 256;
	return (unsigned)(blocks > 65535 ? 65535 : blocks ? blocks : 1);
}

/* --- kernels: grid-stride loops over size_t indices ---------------------- */

__global__ void k_cmul(float2 *x, const float2 *h, size_t n, float s)
{
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x) {
		float2 a = x[k], b = h[k];
		b.y *= s;
		x[k] = make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
	}
}

__global__ void k_ratio(float *t, const float *y, size_t n, float eps)
{
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x)
		t[k] = y[k] / fmaxf(t[k], eps);
}

__global__ void k_update(float *x, const float *c, const float *reg, float lambda, size_t n)
{
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x)
		x[k] = reg ? fabsf((1.0f - lambda) * x[k] * c[k] + lambda * reg[k])
		           : fabsf(x[k] * c[k]);
}

__global__ void k_r26(const float *v, float *o, size_t nz, size_t ny, size_t nx)
{
	size_t n = nz * ny * nx;
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x) {
		size_t x = k % nx, y = (k / nx) % ny, z = k / (nx * ny);
		double s = 0.0;
		for (int c = -1; c <= 1; c++)
			for (int b = -1; b <= 1; b++)
				for (int a = -1; a <= 1; a++) {
					long zz = (long)z + c, yy = (long)y + b, xx = (long)x + a;
					if (zz < 0 || yy < 0 || xx < 0 || zz >= (long)nz ||
					    yy >= (long)ny || xx >= (long)nx)
						continue;
					s += v[((size_t)zz * ny + (size_t)yy) * nx + (size_t)xx];
				}
		o[k] = (float)((s - v[k]) / 26.0);
	}
}

/* dst = taps * src along the axis of length len and stride `stride`. */
__global__ void k_gauss_axis(const float *src, float *dst, const float *w, int radius, size_t n,
                             size_t len, size_t stride)
{
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x) {
		size_t i = (k / stride) % len, base = k - i * stride;
		float s = 0.0f;
		for (int t = -radius; t <= radius; t++) {
			long j = (long)i + t;
			j = j < 0 ? 0 : j >= (long)len ? (long)len - 1 : j;
			s += w[t + radius] * src[base + (size_t)j * stride];
		}
		dst[k] = s;
	}
}

__global__ void k_sumsq(const float *v, size_t n, double *acc)
{
	__shared__ double part[256];
	double s = 0.0;
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x)
		s += (double)v[k] * v[k];
	part[threadIdx.x] = s;
	__syncthreads();
	for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
		if (threadIdx.x < half)
			part[threadIdx.x] += part[threadIdx.x + half];
		__syncthreads();
	}
	if (threadIdx.x == 0)
		atomicAdd(acc, part[0]);
}

/* Biggs-Andrews predict; the same operations as the FFTW engine's. */
__global__ void k_ba_predict(float *x, float *prev, float *origin, float alpha, size_t n)
{
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x) {
		/* prev may be unset when alpha is 0 (first iteration): not read */
		float cur = x[k], y = alpha != 0.0f ? cur + alpha * (cur - prev[k]) : cur;
		y = y > 0.0f ? y : 0.0f;
		prev[k] = cur, x[k] = y, origin[k] = y;
	}
}

/* g = x - g; with g_old, block b writes sum g g_old and sum g_old^2 of its
 * grid-stride share to part[2b], part[2b + 1] (no atomics: the host adds
 * the blocks in order, so the sums are the same from run to run). */
__global__ void k_ba_step(const float *x, float *g, const float *g_old, size_t n, double *part)
{
	__shared__ double gg[256], oo[256];
	double sg = 0.0, so = 0.0;
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x) {
		float step = x[k] - g[k];
		g[k] = step;
		if (g_old) {
			sg += (double)step * g_old[k];
			so += (double)g_old[k] * g_old[k];
		}
	}
	if (!g_old)
		return;
	gg[threadIdx.x] = sg, oo[threadIdx.x] = so;
	__syncthreads();
	for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
		if (threadIdx.x < half) {
			gg[threadIdx.x] += gg[threadIdx.x + half];
			oo[threadIdx.x] += oo[threadIdx.x + half];
		}
		__syncthreads();
	}
	if (threadIdx.x == 0)
		part[2 * blockIdx.x] = gg[0], part[2 * blockIdx.x + 1] = oo[0];
}

/* --- block kernels: one CUDA block per row, its threads along x --------- */

struct shape3 {
	unsigned long long x, y, z;
};

static shape3 shape_of(const size_t v[3])
{
	shape3 s = {v[0], v[1], v[2]};
	return s;
}

static shape3 plan_shape(const sf_fft_plan *p)
{
	shape3 s = {p->nx, p->ny, p->nz};
	return s;
}

__device__ static size_t clamp_to(long long i, unsigned long long n)
{
	return i < 0 ? 0 : i >= (long long)n ? (size_t)n - 1 : (size_t)i;
}

/* Row blockIdx.x (z * N.y + y) of padded dst from compact src at off. */
__global__ void k_pad(float *dst, const float *src, shape3 N, shape3 b, shape3 off, int replicate)
{
	size_t row = blockIdx.x, y = row % N.y, z = row / N.y;
	long long by = (long long)y - (long long)off.y, bz = (long long)z - (long long)off.z;
	int inside_row = by >= 0 && by < (long long)b.y && bz >= 0 && bz < (long long)b.z;
	const float *s = src + (clamp_to(bz, b.z) * b.y + clamp_to(by, b.y)) * b.x;
	float *d = dst + row * N.x;
	for (size_t x = threadIdx.x; x < N.x; x += blockDim.x) {
		long long bx = (long long)x - (long long)off.x;
		int inside = inside_row && bx >= 0 && bx < (long long)b.x;
		d[x] = inside || replicate ? s[clamp_to(bx, b.x)] : 0.0f;
	}
}

/* Row blockIdx.x of compact dst from padded src at off. */
__global__ void k_crop(float *dst, const float *src, shape3 N, shape3 b, shape3 off)
{
	size_t row = blockIdx.x, y = row % b.y, z = row / b.y;
	const float *s = src + ((z + off.z) * N.y + y + off.y) * N.x + off.x;
	for (size_t x = threadIdx.x; x < b.x; x += blockDim.x)
		dst[row * b.x + x] = s[x];
}

__device__ static float ramp_at(size_t i, size_t n, size_t r)
{
	if (r == 0)
		return 1.0f;
	size_t d = i < n - 1 - i ? i : n - 1 - i;
	return d >= r ? 1.0f : (float)d / (float)r;
}

/* deconv.c's taper blend, row blockIdx.x of compact v. */
__global__ void k_taper(float *v, const float *blurred, shape3 N, shape3 b, shape3 off, shape3 w)
{
	size_t row = blockIdx.x, y = row % b.y, z = row / b.y;
	float wzy = ramp_at(z, b.z, w.z) * ramp_at(y, b.y, w.y);
	const float *blur = blurred + ((z + off.z) * N.y + y + off.y) * N.x + off.x;
	float *r = v + row * b.x;
	for (size_t x = threadIdx.x; x < b.x; x += blockDim.x) {
		float wx = wzy * ramp_at(x, b.x, w.x);
		r[x] = wx * r[x] + (1.0f - wx) * blur[x];
	}
}

__global__ void k_subtract(float *v, size_t n, float dark)
{
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x)
		v[k] = fmaxf(v[k] - dark, 0.0f);
}

__global__ void k_fill(float *v, size_t n, float value)
{
	for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
	     k += (size_t)gridDim.x * blockDim.x)
		v[k] = value;
}

/* --- ops ----------------------------------------------------------------- */

static void cufft_plan_destroy(sf_fft_plan *p)
{
	if (!p)
		return;
	cudaSetDevice(p->device);
	if (p->have_r2c)
		cufftDestroy(p->r2c);
	if (p->have_c2r)
		cufftDestroy(p->c2r);
	cudaFree(p->taps);
	cudaFree(p->acc);
	cudaFree(p->part);
	for (int i = 0; i < 2; i++) {
		cudaFreeHost(p->stage[i]);
		if (p->have_ev[i])
			cudaEventDestroy(p->stage_ev[i]);
	}
	if (p->stream)
		cudaStreamDestroy(p->stream);
	free(p);
}

static int cufft_plan_create(const sf_fft_config *cfg, size_t nz, size_t ny, size_t nx,
                             sf_fft_plan **out, sf_err *e)
{
	*out = NULL;
	if (!nz || !ny || !nx || nz > (1u << 20) || ny > (1u << 20) || nx > (1u << 20) ||
	    nz * ny > ((size_t)1 << 40) / nx)
		return sf_fail(e, SF_ERANGE, "cufft: shape %zu x %zu x %zu", nz, ny, nx);
	sf_fft_plan *p = (sf_fft_plan *)calloc(1, sizeof *p);
	if (!p)
		return sf_fail(e, SF_ENOMEM, "cufft: plan");
	p->nz = nz, p->ny = ny, p->nx = nx;
	p->nreal = nz * ny * nx;
	p->ncplx = nz * ny * (nx / 2 + 1);
	p->device = cfg->device;
	int rc = SF_OK;
	cudaError_t err = cudaSetDevice(p->device);
	if (err == cudaSuccess)
		err = cudaStreamCreateWithFlags(&p->stream, cudaStreamNonBlocking);
	if (err == cudaSuccess)
		err = cudaMalloc((void **)&p->taps, MAX_TAPS * sizeof(float));
	if (err == cudaSuccess)
		err = cudaMalloc((void **)&p->acc, sizeof(double));
	if (err == cudaSuccess)
		err = cudaMalloc((void **)&p->part, 2 * MAX_BLOCKS * sizeof(double));
	for (int i = 0; i < 2 && err == cudaSuccess; i++) {
		err = cudaHostAlloc(&p->stage[i], STAGE_BYTES, cudaHostAllocDefault);
		if (err == cudaSuccess)
			err = cudaEventCreateWithFlags(&p->stage_ev[i], cudaEventDisableTiming);
		p->have_ev[i] = err == cudaSuccess;
	}
	if (err != cudaSuccess)
		rc = cuda_fail(e, err, "plan setup");
	cufftResult r = CUFFT_SUCCESS;
	if (!rc) {
		r = cufftPlan3d(&p->r2c, (int)nz, (int)ny, (int)nx, CUFFT_R2C);
		p->have_r2c = r == CUFFT_SUCCESS;
	}
	if (!rc && r == CUFFT_SUCCESS) {
		r = cufftPlan3d(&p->c2r, (int)nz, (int)ny, (int)nx, CUFFT_C2R);
		p->have_c2r = r == CUFFT_SUCCESS;
	}
	if (!rc && r == CUFFT_SUCCESS)
		r = cufftSetStream(p->r2c, p->stream);
	if (!rc && r == CUFFT_SUCCESS)
		r = cufftSetStream(p->c2r, p->stream);
	if (!rc && r != CUFFT_SUCCESS)
		rc = cufft_fail(e, r, "plan");
	if (rc) {
		cufft_plan_destroy(p);
		return rc;
	}
	*out = p;
	return SF_OK;
}

static int cufft_buf_alloc(sf_fft_plan *p, int is_complex, void **out, sf_err *e)
{
	size_t bytes = is_complex ? p->ncplx * sizeof(float2) : p->nreal * sizeof(float);
	cudaError_t err = cudaSetDevice(p->device);
	if (err == cudaSuccess)
		err = cudaMalloc(out, bytes);
	if (err != cudaSuccess) {
		*out = NULL;
		return sf_fail(e, SF_EDEVICE, "cuda: %zu-byte buffer on device %d: %s", bytes,
		               p->device, cudaGetErrorString(err));
	}
	return SF_OK;
}

static void cufft_buf_free(sf_fft_plan *p, void *buf)
{
	cudaSetDevice(p->device);
	cudaFree(buf);
}

/* Host to device through the staging buffers: chunk k waits for the copy
 * that last used its buffer, is copied in by the host, then queued. */
/* Bytes of the staging chunk starting at `at` of a copy of `bytes`. */
static size_t chunk_at(size_t bytes, size_t at)
{
	return bytes - at < STAGE_BYTES ? bytes - at : STAGE_BYTES;
}

static int staged_upload(sf_fft_plan *p, void *dst, const float *src, size_t bytes, sf_err *e)
{
	/* A block starts with an upload, and a context may move between
	 * threads: make its device this thread's for the whole block. */
	cudaError_t err = cudaSetDevice(p->device);
	for (size_t at = 0, k = 0; at < bytes && err == cudaSuccess; at += STAGE_BYTES, k ^= 1) {
		size_t n = chunk_at(bytes, at);
		err = cudaEventSynchronize(p->stage_ev[k]);
		if (err != cudaSuccess)
			break;
		memcpy(p->stage[k], (const char *)src + at, n);
		err = cudaMemcpyAsync((char *)dst + at, p->stage[k], n, cudaMemcpyHostToDevice,
		                      p->stream);
		if (err == cudaSuccess)
			err = cudaEventRecord(p->stage_ev[k], p->stream);
	}
	/* The caller may reuse src as soon as we return: it was copied. */
	return err == cudaSuccess ? SF_OK : cuda_fail(e, err, "upload");
}

/* Device to host: chunk k + 1 is queued before the host copies chunk k out. */
static int staged_download(sf_fft_plan *p, float *dst, const void *src, size_t bytes, sf_err *e)
{
	cudaError_t err = cudaSuccess;
	size_t chunks = (bytes + STAGE_BYTES - 1) / STAGE_BYTES;
	for (size_t k = 0; k <= chunks && err == cudaSuccess; k++) {
		if (k < chunks) {
			size_t at = k * STAGE_BYTES, n = chunk_at(bytes, at);
			err = cudaMemcpyAsync(p->stage[k & 1], (const char *)src + at, n,
			                      cudaMemcpyDeviceToHost, p->stream);
			if (err == cudaSuccess)
				err = cudaEventRecord(p->stage_ev[k & 1], p->stream);
		}
		if (k > 0 && err == cudaSuccess) {
			size_t at = (k - 1) * STAGE_BYTES, n = chunk_at(bytes, at);
			err = cudaEventSynchronize(p->stage_ev[(k - 1) & 1]);
			if (err == cudaSuccess)
				memcpy((char *)dst + at, p->stage[(k - 1) & 1], n);
		}
	}
	return err == cudaSuccess ? SF_OK : cuda_fail(e, err, "download");
}

static int cufft_upload(sf_fft_plan *p, void *dst, const float *src, sf_err *e)
{
	return staged_upload(p, dst, src, p->nreal * sizeof(float), e);
}

static int cufft_download(sf_fft_plan *p, float *dst, const void *src, sf_err *e)
{
	return staged_download(p, dst, src, p->nreal * sizeof(float), e);
}

static int cufft_upload_n(sf_fft_plan *p, void *dst, const float *src, size_t count, sf_err *e)
{
	if (count > p->nreal)
		return sf_fail(e, SF_ERANGE, "cufft: upload of %zu floats into %zu", count,
		               p->nreal);
	return staged_upload(p, dst, src, count * sizeof(float), e);
}

static int cufft_download_n(sf_fft_plan *p, float *dst, const void *src, size_t count, sf_err *e)
{
	if (count > p->nreal)
		return sf_fail(e, SF_ERANGE, "cufft: download of %zu floats from %zu", count,
		               p->nreal);
	return staged_download(p, dst, src, count * sizeof(float), e);
}

static int cufft_forward(sf_fft_plan *p, const void *real_in, void *cplx_out, sf_err *e)
{
	cufftResult r = cufftExecR2C(p->r2c, (cufftReal *)real_in, (cufftComplex *)cplx_out);
	return r == CUFFT_SUCCESS ? SF_OK : cufft_fail(e, r, "R2C");
}

static int cufft_inverse(sf_fft_plan *p, void *cplx_in, void *real_out, sf_err *e)
{
	cufftResult r = cufftExecC2R(p->c2r, (cufftComplex *)cplx_in, (cufftReal *)real_out);
	return r == CUFFT_SUCCESS ? SF_OK : cufft_fail(e, r, "C2R");
}

static int cufft_cmul(sf_fft_plan *p, void *x, const void *h, int conj, sf_err *e)
{
	k_cmul<<<grid_for(p->ncplx), 256, 0, p->stream>>>((float2 *)x, (const float2 *)h, p->ncplx,
	                                                  conj ? -1.0f : 1.0f);
	return launched(e, "cmul");
}

static int cufft_rl_ratio(sf_fft_plan *p, void *hx, const void *y, float eps, sf_err *e)
{
	k_ratio<<<grid_for(p->nreal), 256, 0, p->stream>>>((float *)hx, (const float *)y, p->nreal,
	                                                   eps);
	return launched(e, "ratio");
}

static int cufft_rl_update(sf_fft_plan *p, void *x, const void *c, const void *reg, float lambda,
                           sf_err *e)
{
	k_update<<<grid_for(p->nreal), 256, 0, p->stream>>>((float *)x, (const float *)c,
	                                                    (const float *)reg, lambda, p->nreal);
	return launched(e, "update");
}

static int cufft_r26(sf_fft_plan *p, const void *x, void *out, sf_err *e)
{
	k_r26<<<grid_for(p->nreal), 256, 0, p->stream>>>((const float *)x, (float *)out, p->nz,
	                                                 p->ny, p->nx);
	return launched(e, "r26");
}

static int cufft_gauss(sf_fft_plan *p, void *x, void *tmp, float sigma, int radius, sf_err *e)
{
	if (radius < 0 || 2 * radius + 1 > MAX_TAPS || !(sigma > 0.0f))
		return sf_fail(e, SF_EINVAL, "gauss: sigma=%g radius=%d", sigma, radius);
	float w[MAX_TAPS];
	double sum = 0.0;
	for (int k = -radius; k <= radius; k++)
		sum += exp(-(double)k * k / (2.0 * sigma * sigma));
	for (int k = -radius; k <= radius; k++)
		w[k + radius] = (float)(exp(-(double)k * k / (2.0 * sigma * sigma)) / sum);
	cudaError_t err = cudaMemcpyAsync(p->taps, w, (2 * radius + 1) * sizeof(float),
	                                  cudaMemcpyHostToDevice, p->stream);
	/* w lives on this stack frame: wait for the copy before returning. */
	if (err == cudaSuccess)
		err = cudaStreamSynchronize(p->stream);
	if (err != cudaSuccess)
		return cuda_fail(e, err, "gauss taps");
	float *a = (float *)x, *b = (float *)tmp;
	unsigned g = grid_for(p->nreal);
	k_gauss_axis<<<g, 256, 0, p->stream>>>(a, b, p->taps, radius, p->nreal, p->nx, 1);
	k_gauss_axis<<<g, 256, 0, p->stream>>>(b, a, p->taps, radius, p->nreal, p->ny, p->nx);
	k_gauss_axis<<<g, 256, 0, p->stream>>>(a, b, p->taps, radius, p->nreal, p->nz,
	                                       p->nx * p->ny);
	err = cudaMemcpyAsync(a, b, p->nreal * sizeof(float), cudaMemcpyDeviceToDevice, p->stream);
	if (err != cudaSuccess)
		return cuda_fail(e, err, "gauss copy");
	return launched(e, "gauss");
}

static int cufft_norm2(sf_fft_plan *p, const void *x, double *out, sf_err *e)
{
	double s = 0.0;
	unsigned g = grid_for(p->nreal);
	g = g < 1024 ? g : 1024; /* enough blocks to fill the GPU; few atomics */
	cudaError_t err = cudaMemsetAsync(p->acc, 0, sizeof(double), p->stream);
	if (err == cudaSuccess) {
		k_sumsq<<<g, 256, 0, p->stream>>>((const float *)x, p->nreal, p->acc);
		err = cudaGetLastError();
	}
	if (err == cudaSuccess)
		err = cudaMemcpyAsync(&s, p->acc, sizeof s, cudaMemcpyDeviceToHost, p->stream);
	if (err == cudaSuccess)
		err = cudaStreamSynchronize(p->stream);
	if (err != cudaSuccess)
		return cuda_fail(e, err, "norm2");
	*out = sqrt(s);
	return SF_OK;
}

static int cufft_ba_predict(sf_fft_plan *p, void *x, void *prev, void *origin, float alpha,
                            sf_err *e)
{
	k_ba_predict<<<grid_for(p->nreal), 256, 0, p->stream>>>((float *)x, (float *)prev,
	                                                        (float *)origin, alpha, p->nreal);
	return launched(e, "ba_predict");
}

static int cufft_ba_step(sf_fft_plan *p, const void *x, void *g, const void *g_old, double dots[2],
                         sf_err *e)
{
	double part[2 * MAX_BLOCKS];
	unsigned blocks = grid_for(p->nreal);
	blocks = blocks < MAX_BLOCKS ? blocks : MAX_BLOCKS;
	dots[0] = dots[1] = 0.0;
	k_ba_step<<<blocks, 256, 0, p->stream>>>((const float *)x, (float *)g, (const float *)g_old,
	                                         p->nreal, p->part);
	cudaError_t err = cudaGetLastError();
	if (err != cudaSuccess || !g_old)
		return err == cudaSuccess ? SF_OK : cuda_fail(e, err, "ba_step");
	err = cudaMemcpyAsync(part, p->part, 2 * blocks * sizeof(double), cudaMemcpyDeviceToHost,
	                      p->stream);
	if (err == cudaSuccess)
		err = cudaStreamSynchronize(p->stream);
	if (err != cudaSuccess)
		return cuda_fail(e, err, "ba_step sums");
	for (unsigned b = 0; b < blocks; b++)
		dots[0] += part[2 * b], dots[1] += part[2 * b + 1];
	return SF_OK;
}

static int rows_fit(size_t rows, sf_err *e)
{
	return rows <= 0x7fffffffu ? SF_OK : sf_fail(e, SF_ERANGE, "cufft: %zu rows", rows);
}

static int cufft_pad(sf_fft_plan *p, void *dst, const void *src, const size_t blk[3],
                     const size_t off[3], int replicate, sf_err *e)
{
	if (blk[0] + off[0] > p->nx || blk[1] + off[1] > p->ny || blk[2] + off[2] > p->nz ||
	    !blk[0] || !blk[1] || !blk[2])
		return sf_fail(e, SF_ERANGE, "cufft: pad of a block outside the plan");
	int rc = rows_fit(p->ny * p->nz, e);
	if (rc)
		return rc;
	k_pad<<<(unsigned)(p->ny * p->nz), 256, 0, p->stream>>>((float *)dst, (const float *)src,
	                                                        plan_shape(p), shape_of(blk),
	                                                        shape_of(off), replicate);
	return launched(e, "pad");
}

static int cufft_crop(sf_fft_plan *p, void *dst, const void *src, const size_t blk[3],
                      const size_t off[3], sf_err *e)
{
	int rc = rows_fit(blk[1] * blk[2], e);
	if (rc || !blk[1] || !blk[2])
		return rc;
	k_crop<<<(unsigned)(blk[1] * blk[2]), 256, 0, p->stream>>>(
	    (float *)dst, (const float *)src, plan_shape(p), shape_of(blk), shape_of(off));
	return launched(e, "crop");
}

static int cufft_taper(sf_fft_plan *p, void *v, const void *blurred, const size_t blk[3],
                       const size_t off[3], const size_t width[3], sf_err *e)
{
	int rc = rows_fit(blk[1] * blk[2], e);
	if (rc || !blk[1] || !blk[2])
		return rc;
	k_taper<<<(unsigned)(blk[1] * blk[2]), 256, 0, p->stream>>>(
	    (float *)v, (const float *)blurred, plan_shape(p), shape_of(blk), shape_of(off),
	    shape_of(width));
	return launched(e, "taper");
}

static int cufft_filter_axis(sf_fft_plan *p, void *dst, const void *src, const size_t blk[3],
                             int axis, const float *taps, int radius, sf_err *e)
{
	size_t n = blk[0] * blk[1] * blk[2];
	size_t len = blk[axis], stride = axis == 0 ? 1 : axis == 1 ? blk[0] : blk[0] * blk[1];
	if (radius < 0 || 2 * radius + 1 > MAX_TAPS || axis < 0 || axis > 2 || n > p->nreal)
		return sf_fail(e, SF_EINVAL, "filter_axis: axis %d radius %d", axis, radius);
	cudaError_t err = cudaMemcpyAsync(p->taps, taps, (2 * radius + 1) * sizeof(float),
	                                  cudaMemcpyHostToDevice, p->stream);
	if (err == cudaSuccess) /* taps may live on the caller's stack */
		err = cudaStreamSynchronize(p->stream);
	if (err != cudaSuccess)
		return cuda_fail(e, err, "filter taps");
	k_gauss_axis<<<grid_for(n), 256, 0, p->stream>>>((const float *)src, (float *)dst, p->taps,
	                                                 radius, n, len, stride);
	return launched(e, "filter_axis");
}

static int cufft_subtract(sf_fft_plan *p, void *v, size_t count, float dark, sf_err *e)
{
	k_subtract<<<grid_for(count), 256, 0, p->stream>>>((float *)v, count, dark);
	return launched(e, "subtract");
}

static int cufft_fill(sf_fft_plan *p, void *v, size_t count, float value, sf_err *e)
{
	k_fill<<<grid_for(count), 256, 0, p->stream>>>((float *)v, count, value);
	return launched(e, "fill");
}

static const sf_fft_ops cufft_ops = {
    "cufft",
    cufft_plan_create,
    cufft_plan_destroy,
    cufft_buf_alloc,
    cufft_buf_free,
    cufft_upload,
    cufft_download,
    cufft_forward,
    cufft_inverse,
    cufft_cmul,
    cufft_rl_ratio,
    cufft_rl_update,
    cufft_r26,
    cufft_gauss,
    cufft_norm2,
    cufft_ba_predict,
    cufft_ba_step,
    NULL,
    NULL,
    NULL, /* no fused forms: deconv.c composes them */
    cufft_upload_n,
    cufft_download_n,
    cufft_pad,
    cufft_crop,
    cufft_filter_axis,
    cufft_subtract,
    cufft_taper,
    cufft_fill,
};

extern "C" const sf_fft_ops *sf_fft_cufft_ops(void)
{
	return &cufft_ops;
}

extern "C" int sf_fft_cuda_mem_info(int device, size_t *free_bytes, size_t *total_bytes, sf_err *e)
{
	cudaError_t err = cudaSetDevice(device);
	if (err == cudaSuccess)
		err = cudaMemGetInfo(free_bytes, total_bytes);
	return err == cudaSuccess ? SF_OK : cuda_fail(e, err, "cudaMemGetInfo");
}

extern "C" int sf_fft_cuda_device_count(void)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess)
		return 0;
	return n;
}
