"""Quality and performance harnesses; each writes JSON + Markdown under benchmarks/results/."""
