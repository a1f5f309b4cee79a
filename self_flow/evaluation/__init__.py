"""Evaluation of trained models: in-training evaluators per modality and the offline tools.

In training (`train.py`), `evaluator.ImageEvaluator`, `video_evaluator` and `audio_evaluator`
sample the EMA (and student) weights through `generation` and score them with small classifiers
trained on the embedded data (`classifier`, Fréchet distance in their feature space: no
Inception weights can be downloaded here), plus the optional `linear_probe` and
`stratified_loss`. Offline, `adm_metrics` scores a sample .npz against a reference batch with
the FID InceptionV3 of `inception` (user-supplied weights), the ADM evaluator's protocol.
"""
