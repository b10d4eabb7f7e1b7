"""The pass library. Each module defines one pass and registers it with tinygrad_ext.register(); importing this package
registers them all, in the order listed here."""
from passes import reduce_local  # noqa: F401,E402
from passes import fusion  # noqa: F401,E402
from passes import matvec  # noqa: F401,E402
from passes import long_reduce  # noqa: F401,E402
from passes import packed_loads  # noqa: F401,E402
from passes import wide_loads  # noqa: F401,E402
from passes import hoist  # noqa: F401,E402
from passes import subnormal_dequant  # noqa: F401,E402
from passes import int_to_float  # noqa: F401,E402
