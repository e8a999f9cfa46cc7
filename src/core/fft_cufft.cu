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

#define MAX_TAPS   1025
#define MAX_BLOCKS 1024 /* reduction grids: enough blocks to fill the GPU */

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

static int cufft_upload(sf_fft_plan *p, void *dst, const float *src, sf_err *e)
{
	cudaError_t err =
	    cudaMemcpyAsync(dst, src, p->nreal * sizeof(float), cudaMemcpyHostToDevice, p->stream);
	/* The host array may be reused as soon as we return. */
	if (err == cudaSuccess)
		err = cudaStreamSynchronize(p->stream);
	return err == cudaSuccess ? SF_OK : cuda_fail(e, err, "upload");
}

static int cufft_download(sf_fft_plan *p, float *dst, const void *src, sf_err *e)
{
	cudaError_t err =
	    cudaMemcpyAsync(dst, src, p->nreal * sizeof(float), cudaMemcpyDeviceToHost, p->stream);
	if (err == cudaSuccess)
		err = cudaStreamSynchronize(p->stream);
	return err == cudaSuccess ? SF_OK : cuda_fail(e, err, "download");
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
