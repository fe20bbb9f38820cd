"""The playbook's experiments as commands: `python -m lmjax.experiments.<name> --workdir=DIR [--quick]`.

  anneal_probe  annealing as a data-quality probe (Llama 3): a verdict per candidate source
  cooldown      constant LR + linear / 1-sqrt / cosine cooldown vs cosine (Haegele et al. 2024)
  mixture       a grid over the zh:en ratio and the code share: held-out loss per source, heat-maps
  dcpt          D-CPT Law sweep -> fit -> recommendation with bootstrap intervals; cross-domain law
  cpt_lr        the LR of continued pretraining: domain gain and forgetting per LR and model size
  overtrain     a small model far past the Chinchilla-optimal tokens of a fitted law

Every run is an ordinary lmjax.train run (a config file plus overrides, trained by lmjax.trainer);
the runner is lmjax.scaling.sweep's, so re-running a command skips finished runs and resumes
unfinished ones. `--quick` is the 2-CPU-core setting CI runs. common.py holds what they share;
docs/experiments.md has the commands and the numbers of full CPU runs; notebooks/experiments.ipynb
runs each at a tiny budget.
"""
