"""ugsep's graph passes, in two families (import the one you need; neither imports the other):

    graph_passes.fx     on torch.export graphs (needs torch): SideAnalysisPass, FlopCountPass,
                        SplitUserGroupPass -> the UG split (user graph, group graph, boundary)
    graph_passes.onnx   on ONNX models via onnx-ir (no torch): canonicalize_linear,
                        QuantizeWeightsInt8Pass, LowerToMatMulNBitsPass, Fp16ActivationsPass,
                        the TensorRT readiness check (trt_support.check_trt_readiness)

Each pass takes its configuration in ``__init__`` and does its work in ``call``; every node
a pass creates or rewrites records the pass's name (FX: ``node.meta["ugsep.pass"]``, ONNX:
``metadata_props["ugsep.pass"]``), so parity localisation can name it.
"""
