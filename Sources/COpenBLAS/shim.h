// OpenBLAS's CBLAS interface (Debian libopenblas-dev). Only sgemm and the thread setter are used.
#include <cblas.h>
void openblas_set_num_threads(int num_threads);
