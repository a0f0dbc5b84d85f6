"""A stand-in for LoadedBundle that runs each kernel's CUDA schedule on the CPU
(:mod:`rnn_sparsify.codegen.emulate`: the tensor-core / SIMT schedule with scalar intrinsics and
serial thread loops, built for LLVM), so the backend's check/allocate/launch/finish code is
tested without a GPU, on the same tiling and fragment arithmetic the cubins use."""
from types import SimpleNamespace

import numpy as np
import torch

from rnn_sparsify.codegen import emulate
from rnn_sparsify.codegen.gemm_gather import problem_key


class EmulatedBundle:
    device = torch.device("cpu")

    def __init__(self, tvm, specs):
        self.tvm = tvm
        self.kernels = {}
        self.launches = 0
        for spec in specs:
            fn = emulate.build(spec)[spec.name]
            shapes = {n: (tuple(s), dt) for n, s, dt in spec.params()}
            self.kernels[spec.problem] = SimpleNamespace(
                spec=spec, shapes=shapes, out_shape=shapes["C"][0], fn=fn,
                entry=SimpleNamespace(symbol=f"{spec.name}_kernel", spec=spec.to_dict()))

    def dtypes(self):
        return {k.spec.dtype for k in self.kernels.values()}

    def find(self, spec_dict):
        return self.kernels.get(problem_key(spec_dict))

    def launch(self, kernel, args):
        dev = self.tvm.cpu()
        arrays = []
        for name, (shape, dt) in kernel.shapes.items():
            t = args[name]
            assert tuple(t.shape) == shape and t.is_contiguous(), (name, t.shape, shape)
            assert str(t.dtype).replace("torch.", "") == dt, (name, t.dtype, dt)
            arrays.append(self.tvm.runtime.tensor(t.float().numpy().astype(np.float16) if dt == "float16"
                                                  else t.numpy(), dev))
        kernel.fn(*arrays)
        args["C"].copy_(torch.from_numpy(arrays[-1].numpy()))
        self.launches += 1
