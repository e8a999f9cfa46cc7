/* cpus.h — how many CPUs this process may use.
 *
 * The count in its affinity mask (what `nproc` prints): a SLURM step with
 * --cpus-per-task=4 on a 128-core node, taskset or a cpuset gets 4, not the
 * node's 128 that sysconf(_SC_NPROCESSORS_ONLN) reports.  Falls back to the
 * online CPUs, and is at least 1.  The default of threads= (one per CPU). */
#ifndef SCOPEFS_CPUS_H
#define SCOPEFS_CPUS_H

unsigned sf_cpus_usable(void);

#endif
