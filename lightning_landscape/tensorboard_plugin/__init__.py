"""The "Landscape" tab of TensorBoard: a dynamic plugin found through the wheel's
``tensorboard_plugins`` entry point. :class:`~.plugin.LandscapePlugin` serves the frontend in
``static/`` and the runs' data; the charts use uPlot 1.6.32 (MIT, ``static/uPlot.LICENSE``),
vendored from ``npm pack uplot@1.6.32`` (sha1 c800a63b432bad692d6d746f44f0882aa73a49ae):
``dist/uPlot.esm.js`` and ``dist/uPlot.min.css`` unmodified."""
