"""The pass library: one module per pass, each registering itself with tinygrad_ext.register(). Where several passes
share a hook point, tinygrad_ext/pipeline.py orders them, not the order of these imports."""
from tinygrad_ext.passes import fusion, hoist, int_to_float, late_producers, long_reduce, matvec, packed_loads, pdl, quant_gemm, reduce_local, subnormal_dequant, tc_contiguous_k, wide_loads  # noqa: F401
