"""The demo's machinery: what stands in for the data and the CLIP that cannot be downloaded here.

Generated data sets in Market-1501's and the vehicle sets' formats (:mod:`.synth`), captions of
the generated people (:mod:`.captions`), the miniature CLIP pretrained on generated image-caption
pairs (:mod:`.pretrain`), zero-shot caption retrieval and text search (:mod:`.zeroshot`), and the
``make demo`` run itself (:mod:`.run`). The core never imports this package.

Example::

    from reidlib.demo.synth import generate_market
    generate_market("data/synth", ids=60, cams=4, seed=0)
    # python -m reidlib demo: data -> miniature -> baseline vs proposed -> results/demo/
"""
