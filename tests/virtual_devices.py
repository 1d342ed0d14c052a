"""Several CUDA devices simulated on the CPU, to test code meant for a model sharded over GPUs.

:class:`VirtualDevices` is a torch function mode: tensors compute on the CPU, but each carries the
device it would live on (``cuda:0``, ``cuda:1``, ...), reports it through ``tensor.device``, moves
with ``.to()``/``.cuda()``/``.cpu()``, and every operation is checked as CUDA would check it: its
tensors must share one device, except CPU scalars (0-dimensional) and CPU index tensors in ``[]``.
A mismatch raises as on a GPU, so code that builds an index on ``handle.device`` and applies it to a
layer on another device fails here exactly where it would fail on real hardware.

Not simulated: memory, streams, peer access, speed. ``torch.cuda`` functions stay what the CPU build
makes them; tests patch the few the code calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from unittest.mock import patch

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

CPU = torch.device("cpu")
_DEVICE_GETTER = torch.Tensor.device.__get__
_GRAD_GETTER = torch.Tensor.grad.__get__
_DATA_SETTER = torch.Tensor.data.__set__  # nn.Module.to() swaps each parameter's data
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
# CUDA accepts CPU index tensors in advanced indexing
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
# recurrent networks keep packed sequences' batch sizes and lengths on the CPU
_PACKING = {"_pack_padded_sequence", "_pad_packed_sequence"}
_CPU_INDEX_ARGUMENTS = {*_PACKING, "lstm", "gru", "rnn_tanh", "rnn_relu"}
# autograd follows the graph over any number of devices
_ANY_DEVICES = {torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward}
# copies between devices are legal on a GPU; the shallow-copy check only compares types
_CROSS_DEVICE = {torch.Tensor.copy_, torch._has_compatible_shallow_copy_type}


def as_device(place) -> torch.device | None:
    """A device from what torch accepts as one (``"cuda:1"``, ``1``, ``torch.device``), else None."""
    if isinstance(place, torch.device):
        device = place
    elif isinstance(place, str):
        try:
            device = torch.device(place)
        except RuntimeError:
            return None
    elif isinstance(place, int) and not isinstance(place, bool):
        device = torch.device("cuda", place)
    else:
        return None
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", 0)
    return device


_LABELS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # tensor -> its simulated device


class DeviceMismatch(RuntimeError):
    """An operation mixed tensors of two devices, as CUDA would refuse."""


class VirtualDevices(TorchFunctionMode):
    """See the module docstring. Place tensors with :meth:`place`; use as a context manager."""

    def __init__(self) -> None:
        super().__init__()
        # Where a tensor lives is the tensor's own property, shared by every simulation of the
        # process: objects cached across tests (a sentence encoder moved to "cuda:0") keep it.
        self.labels = _LABELS
        self.checked_ops = 0

    # ---- placement ------------------------------------------------------------------------------
    def place(self, tensors: torch.Tensor | torch.nn.Module | Iterable[torch.Tensor], device) -> None:
        """Say that these tensors (a module's parameters and buffers) live on ``device``."""
        target = as_device(device)
        if isinstance(tensors, torch.nn.Module):
            tensors = [*tensors.parameters(), *tensors.buffers()]
        elif isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for tensor in tensors:
            self._label(tensor, target)

    def device_of(self, tensor: torch.Tensor) -> torch.device:
        """Where ``tensor`` would live."""
        return self.labels.get(tensor, CPU)

    def _label(self, tensor: torch.Tensor, device: torch.device) -> None:
        if device == CPU:
            self.labels.pop(tensor, None)
        else:
            self.labels[tensor] = device

    # ---- the mode -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == _DEVICE_GETTER:
            return self.device_of(args[0])
        if func == _GRAD_GETTER:
            grad = func(*args, **kwargs)
            if grad is not None and grad not in self.labels:
                self._label(grad, self.device_of(args[0]))
            return grad
        if func == _DATA_SETTER:
            func(*args, **kwargs)
            self._label(args[0], self.device_of(args[1]))
            return None
        if func in _MOVES:
            return self._move(func, args, kwargs)
        if func is torch.Tensor.numpy and self.device_of(args[0]) != CPU:
            raise TypeError(f"can't convert {self.device_of(args[0])} device type tensor to numpy")
        requested = as_device(kwargs.get("device"))
        if func in _ANY_DEVICES:
            target = None
        elif requested is not None:
            kwargs["device"] = CPU  # factory functions: compute on the CPU, remember the device
            target = requested
        elif getattr(func, "__name__", "").startswith("_foreach_"):
            return self._foreach(func, args, kwargs)
        else:
            target = self._common_device(func, args, kwargs)
        result = func(*args, **kwargs)
        if requested is not None and any(result is arg for arg in args):
            result = result.clone()  # as_tensor(t, device=...) on another device is a copy, not t
        if func is torch.autograd.grad:  # gradients live with their inputs
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
            for grad, source in zip(result, inputs, strict=True):
                if grad is not None:
                    self._label(grad, self.device_of(source))
            return result
        if getattr(func, "__name__", "") in _PACKING:
            if target is not None:
                self._label(result[0], target)
            return result  # batch sizes and lengths stay on the CPU, as on a GPU
        if target is not None:
            tree_map(lambda out: self._label(out, target) if isinstance(out, torch.Tensor) else None, result)
        return result

    def _common_device(self, func, args, kwargs) -> torch.device | None:
        """The one device of the operation's tensors (None if it has none); raises on a mismatch."""
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if not tensors:
            return None
        self.checked_ops += 1
        devices = {}
        for position, tensor in enumerate(tensors):
            device = self.device_of(tensor)
            if device == CPU and tensor.dim() == 0:
                continue  # CPU scalars mix with any device
            if device == CPU and position > 0 and tensor.dtype in (torch.long, torch.int, torch.bool) and (
                    func in _INDEXING or getattr(func, "__name__", "") in _CPU_INDEX_ARGUMENTS):
                continue  # CPU index tensors too (and an RNN's sequence lengths, which must be there)
            devices.setdefault(device, tensor)
        if func in _CROSS_DEVICE:
            return self.device_of(tensors[0])
        if len(devices) > 1:
            raise DeviceMismatch(
                f"{getattr(func, '__qualname__', func)}: expected all tensors to be on the same device, "
                f"but found at least two devices, {' and '.join(str(d) for d in devices)}!")
        if devices:
            return next(iter(devices))
        return self.device_of(tensors[0])

    def _foreach(self, func, args, kwargs):
        """Optimisers' ``_foreach_*`` ops take lists of tensors: torch groups them by device first,
        so the i-th tensors of the lists must share a device (a group per device on a GPU; here the
        CPU build groups every tensor together)."""
        lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))
                 and a and isinstance(a[0], torch.Tensor)]
        targets = [self._common_device(func, [lst[i] for lst in lists], {}) for i in range(len(lists[0]))]
        result = func(*args, **kwargs)
        if isinstance(result, (list, tuple)):
            for out, target in zip(result, targets, strict=True):
                if target is not None:
                    self._label(out, target)
        return result

    def _move(self, func, args, kwargs):
        tensor, source = args[0], self.device_of(args[0])
        if func is torch.Tensor.cpu:
            target = CPU
        elif func is torch.Tensor.cuda:
            place = args[1] if len(args) > 1 else kwargs.get("device")
            target = as_device(place if place is not None else "cuda")
        else:
            target = None
            rest = list(args[1:])
            for i, value in enumerate(rest):
                if isinstance(value, torch.Tensor):  # tensor.to(other): other's device and dtype
                    target, rest[i] = self.device_of(value), value.dtype
                elif as_device(value) is not None:
                    target, rest[i] = as_device(value), CPU
            if as_device(kwargs.get("device")) is not None:
                target, kwargs["device"] = as_device(kwargs["device"]), CPU
            args = (tensor, *rest)
            func = torch.Tensor.to
        if target is None or target == source:
            if func is torch.Tensor.to:
                result = func(*args, **kwargs)
                if result is not tensor:
                    self._label(result, source)
                return result
            return tensor
        moved = torch.Tensor.to(*args, **kwargs) if func is torch.Tensor.to else tensor
        if moved is tensor:
            moved = tensor.clone()  # another device means another tensor
        self._label(moved, target)
        return moved


class _PlacedHook(AlignDevicesHook):
    """accelerate's hook as ``dispatch_model`` attaches it for a block on a GPU: inputs go to the
    block's device before it runs. Placing the weights is left to :meth:`VirtualDevices.place`."""

    def init_hook(self, module):
        return module


def shard(handle, mode: VirtualDevices, n_devices: int = 2) -> dict[str, torch.device]:
    """Spread ``handle``'s model over ``n_devices`` simulated GPUs the way ``device_map="auto"``
    would: consecutive blocks per device, the embeddings on the first, the final norm and unembedding
    on the last (on the first where the unembedding is tied to the embeddings). Returns the map."""
    model, arch = handle.model, handle.arch
    layers = arch.get_blocks(model)
    devices = [torch.device("cuda", i) for i in range(n_devices)]
    placement: dict[torch.nn.Module, torch.device] = {model: devices[0]}
    per_device = -(-len(layers) // n_devices)
    for i, layer in enumerate(layers):
        placement[layer] = devices[i // per_device]
    unembed = model.get_output_embeddings()
    tied = unembed.weight is model.get_input_embeddings().weight
    placement[unembed] = devices[0] if tied else devices[-1]
    placement[model.get_submodule(arch.final_norm)] = devices[-1]
    for module, device in placement.items():
        if module is not model:
            mode.place(module, device)
            add_hook_to_module(module, _PlacedHook(execution_device=device))
    # the rest (embeddings, positions) on the first device; outputs come back where inputs were
    owned = {id(t) for m in placement if m is not model for t in [*m.parameters(), *m.buffers()]}
    mode.place([t for t in [*model.parameters(), *model.buffers()] if id(t) not in owned], devices[0])
    add_hook_to_module(model, _PlacedHook(execution_device=devices[0], io_same_device=True), append=True)
    names = {module: name for name, module in model.named_modules()}
    model.hf_device_map = {names[m] or "": d for m, d in placement.items()}
    return model.hf_device_map


@contextmanager
def cuda_runtime(free_bytes: int = 80 * 2**30) -> Iterator[dict[str, list]]:
    """The few ``torch.cuda`` calls EditScope makes, answered as by GPUs with ``free_bytes`` free and
    nothing allocated (a CPU build raises on them). Yields the calls made, by function name."""
    calls: dict[str, list] = {}

    def recorder(name, value):
        def call(*args, **kwargs):
            calls.setdefault(name, []).append(args)
            return value
        return call

    answers = {"synchronize": None, "memory_allocated": 0, "reset_peak_memory_stats": None,
               "max_memory_allocated": 0, "mem_get_info": (free_bytes, free_bytes),
               "get_device_name": "virtual GPU", "is_bf16_supported": True}
    with ExitStack() as stack:
        for name, value in answers.items():
            stack.enter_context(patch.object(torch.cuda, name, recorder(name, value)))
        yield calls
