"""``fastlm.harness`` moved to ``fastlm.evaluation.harness``; this name stays importable (it
registers the "fastlm" model with lm-eval) and ``python -m fastlm.harness`` still runs
lm-eval's command line."""
from .evaluation.harness import FastLM, main

__all__ = ["FastLM", "main"]

if __name__ == "__main__":
    main()
