"""Networks: backbones (:mod:`.backbones`: PVTv2, timm), RTA-Former (:mod:`.rta_former`), CA-Stream
pooling and the timm classifiers around it (:mod:`.ca_stream`), AffinityNet (:mod:`.affinitynet`).
Registered by :mod:`foveal.plugins`."""
