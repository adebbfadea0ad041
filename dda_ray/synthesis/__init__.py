"""Stage 1, synthesis: model inversion of the teacher into a bank of images.

* :mod:`~dda_ray.synthesis.synthesizer`: the rounds (dda and cmi: a fresh generator per round; fast:
  a meta-learned one), each seeded, with or without the student;
* :mod:`~dda_ray.synthesis.initial_bank`: the run's Synthesizer (the one construction) and the initial
  bank, in this process or over Ray tasks.
"""
