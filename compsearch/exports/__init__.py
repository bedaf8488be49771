"""Serving formats derived from the compsearch artifact (the source of truth), each checked by its
own library: ONNX, run by ONNX Runtime (:mod:`compsearch.exports.onnx`)."""
