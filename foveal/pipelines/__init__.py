"""Applications built on the library: ``foveal demo`` (:mod:`.demo`), the weakly-supervised
segmentation pipeline (:mod:`.wsss`) and the GAP vs CA-Stream study of CA-Stream Table 1
(:mod:`.pooling_study`)."""
