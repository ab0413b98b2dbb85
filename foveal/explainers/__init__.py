"""Explainers, by family (each module cites its papers):

* :mod:`.cam`: the CAM base (target layer, activation/gradient capture, targets of perturbed inputs);
* :mod:`.gradient_cams`: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, HiResCAM, SmoothGrad-CAM++,
  Shapley-CAM, Finer-CAM, Abs-CAM phase 1;
* :mod:`.score_cams`: Score-CAM, Abs-CAM, Ablation-CAM;
* :mod:`.decomposition_cams`: Eigen-CAM, KPCA-CAM;
* :mod:`.input_gradients`: gradient x input, integrated gradients, SmoothGrad (input space);
* :mod:`.attention_guided`: attention-map-guided CAM;
* :mod:`.relevance`: the relevance-propagation machinery for transformers (rules as autograd
  functions installed by a ``TorchFunctionMode``) and the ViT explainer base;
* :mod:`.vit_lrp`: Chefer et al.'s transformer attribution; :mod:`.attention_baselines`: its
  baselines (rollout, raw attention, attention Grad-CAM, partial LRP);
* :mod:`.ca_attention`: CA-Stream's cross-attention map;
* :mod:`.tokens`: ViT token sequences as image grids.

Registered by :mod:`foveal.plugins.explainers`.
"""
