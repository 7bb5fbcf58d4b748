#include "embkern/hypercomplex.h"
