"""Stages 2 and 3, augment and filter: diffusion variations of the bank's images, kept by the teacher.

* :mod:`~dda_ray.augment.augmenter`: the Augmenter (variations through one backend, seeded per image);
* :mod:`~dda_ray.augment.backends`: local prior, SD img2img, SD image variations (``from_pretrained``);
  :mod:`~dda_ray.augment.sampling` their shared SDEdit/DDIM loop;
  :mod:`~dda_ray.augment.pipeline_class_img2img` the local prior's diffusers pipeline;
* :mod:`~dda_ray.augment.prior`: training the local prior; :mod:`~dda_ray.augment.prior_sources` its
  sources (a bank, a folder, photographs in package wheels); :mod:`~dda_ray.augment.crops` teacher-labelled
  photo crops as extra KD rows;
* :mod:`~dda_ray.augment.filter`: the cosine filter; :mod:`~dda_ray.augment.grids` image grids.
"""
