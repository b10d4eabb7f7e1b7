"""A test-only pass: it really rewrites kernels (x*2 -> x+x, exact in every dtype), so the registry, the toggles and cache
isolation are exercised on a pass that changes the generated source."""
from tinygrad.uop.ops import PatternMatcher, UPat, Ops, graph_rewrite
from tinygrad_ext import Pass, CodegenStep

pm_double_to_add = PatternMatcher([
  (UPat(Ops.MUL, src=[UPat.var("x"), UPat.cvar("c")]), lambda x,c: x+x if c.arg == 2 else None),
])

DOUBLE_TO_ADD = Pass("test_double_to_add", "test only: rewrites x*2 into x+x after tinygrad's final rewrite",
                     (CodegenStep("final rewrite", lambda sink, ren: graph_rewrite(sink, pm_double_to_add, name="test: x*2 -> x+x")),))
