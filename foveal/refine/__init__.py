"""From explanations to masks: pixel-pair geometry (:mod:`.pairs`), confident labels from seeds
(:mod:`.seeds`), the AffinityNet random walk (:mod:`.random_walk`) and the optional dense CRF
(:mod:`.crf`)."""
