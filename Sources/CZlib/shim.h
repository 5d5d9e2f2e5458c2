// zlib (Debian zlib1g-dev): raw-deflate decoding and CRC-32 for .npz archives.
#include <zlib.h>
