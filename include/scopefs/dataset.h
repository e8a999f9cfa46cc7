/* dataset.h — what a raw folder holds: whole-slide images and z-stacks.
 *
 * Scanning reads headers only and never writes to the folder.  A file that
 * cannot be used is left out with a reason (a problem) and the scan goes on;
 * the detection rules are in docs/dataset.md:
 *  - a folder (RAW_DIR itself or a direct subfolder) whose TIFF files are all
 *    single-page (plain or OME), untiled, of one size and type, two or more
 *    of them, is a stack of planes (sorted by name);
 *  - a multi-page TIFF whose pages are one size and type, untiled, with no
 *    reduced levels (or OME-XML with SizeZ > 1 and SizeC == 1) is a stack,
 *    unless it is a time series (OME SizeT or ImageJ frames > 1), a page
 *    breaks its run of planes or it states another plane count (SizeZ,
 *    ImageJ slices=) than it has pages: then it is a problem, neither stack
 *    nor slide.  ImageJ's layout for stacks over 4 GiB (one IFD stating
 *    slices=N, the N planes stored after it: sf_slide_info.contig_planes) is
 *    a stack of N planes; one page with ImageJ slices > 1 in any other
 *    layout, or cut short, is a problem;
 *  - an image-named entry of a plane folder that is not a usable file (a
 *    folder, fifo, device, broken or outside link) is a problem and keeps the
 *    folder from being served: it would be a hole in the stack;
 *  - an OME-TIFF with SizeC > 1 and SizeZ > 1, or an ImageJ file of several
 *    pages with channels= > 1, slices= > 1 and frames= <= 1 (one sample per
 *    pixel), is one stack per channel, <stem>_c<C>, its planes picked from
 *    the pages by the DimensionOrder (ImageJ's is always XYCZT); a time
 *    series, an odd page, other than SizeC*SizeZ pages or an unknown
 *    DimensionOrder make it a problem instead;
 *  - any other TIFF-family file (.tif .tiff .ome.tif .ome.tiff .svs .btf .tf8)
 *    directly in RAW_DIR is a whole-slide image, sorted by name, unless it is
 *    a time series (OME SizeT or ImageJ frames > 1) whose pages hold more than
 *    one time point (sf_slide_time_point_pages): then it is a problem, not a
 *    slide whose time points are extra channels. */
#ifndef SCOPEFS_DATASET_H
#define SCOPEFS_DATASET_H

#include <stdint.h>
#include <sys/types.h>

#include "scopefs/err.h"
#include "scopefs/slide.h"

typedef struct sf_stack {
	char *name; /* folder or file stem; "" when RAW_DIR itself is the stack */
	uint32_t planes;
	char **plane_names;         /* file names served under deconvolved/<name>/ */
	sf_slide_info **plane_info; /* one per plane file; all NULL but [0] for a multi-page file */
	int multipage;              /* planes are the pages ("channels") of plane_info[0] */
	/* Multi-page: plane z is page page_first + z * page_step of plane_info[0]; 0 and 1
	 * unless the stack is one channel of a multichannel z-stack (then each
	 * channel's stack holds its own probe of the file in plane_info[0]). */
	uint32_t page_first, page_step;
	uint32_t width, height;
	sf_dtype dtype;
} sf_stack;

typedef struct sf_problem {
	char *path;   /* the file or folder left out */
	char *reason; /* one line */
} sf_problem;

typedef struct sf_dataset {
	char *root; /* absolute path of RAW_DIR */
	sf_slide_info **slides;
	char **slide_stems; /* file name without its image extension */
	uint32_t slide_count;
	sf_stack **stacks;
	uint32_t stack_count;
	sf_problem *problems;
	uint32_t problem_count;
} sf_dataset;

/* Scan root.  Fails only when root itself is unusable (not a folder,
 * unreadable); bad files become problems. */
int sf_dataset_scan(const char *root, sf_dataset **out, sf_err *e);
void sf_dataset_free(sf_dataset *d);

/* Add a problem for path (reason copied), unless path has one already:
 * the mount's walk of raw/ reports what it leaves out below the folders the
 * scan looks at.  SF_ENOMEM or SF_OK. */
int sf_dataset_add_problem(sf_dataset *d, const char *path, const char *reason);

/* What kind of non-regular, non-folder file mode is: "fifo", "socket",
 * "character device", ... */
const char *sf_special_kind(mode_t mode);

/* The stem of a file name: "a.ome.tiff" -> "a", "b.svs" -> "b". Caller frees. */
char *sf_file_stem(const char *name);

#endif
