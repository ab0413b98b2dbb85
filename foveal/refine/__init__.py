"""From explanations to masks: pixel-pair geometry (:mod:`.pairs`), confident labels from seeds
(:mod:`.seeds`), the AffinityNet random walk and its presets (:mod:`.random_walk`), the optional
dense CRF (:mod:`.crf`) and the per-image seed files and label PNGs of the weakly-supervised
pipeline (:mod:`.store`)."""
