"""GLM-4.7-Flash in plain tinygrad: model.py (the model), synth.py (synthetic GGUFs), run.py (generate, benchmark, profile)."""
