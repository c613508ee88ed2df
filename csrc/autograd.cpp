// The Autograd and ADInplaceOrView kernels of the one in-place op, fifo_push, for every backend.
// The functional ops get theirs from comet_ext/ops.py (torch.library.register_autograd);
// an op that mutates its arguments cannot, and without a kernel here a direct
// torch.ops.comet.fifo_push call would write a buffer that requires grad (dropping
// the gradient of the rows written into it) and leave its version counter alone,
// so autograd and anything keyed on versions would not see the write. This is
// what torch's own in-place ops do at these keys: refuse what they cannot
// differentiate, redispatch, then bump the versions of what they wrote.
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "common.h"

namespace comet {
namespace {

// A tangent at the default forward-AD level (torch.autograd.forward_ad): the push
// would copy the rows' values into the buffer and leave its tangent stale.
bool has_tangent(const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }

using PushFn = void(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&);

void call_push(at::Tensor& buffer, at::Tensor& head, at::Tensor& length, const at::Tensor& rows,
               const at::Tensor& counts) {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("comet::fifo_push", "").typed<PushFn>();
  handle.call(buffer, head, length, rows, counts);
}

// Autograd: refuses what a non-differentiable in-place op cannot take, then goes on to
// ADInplaceOrView. (Skipped under inference mode, where nothing can require grad and
// inference tensors may be written.)
void fifo_push_autograd(at::Tensor& buffer, at::Tensor& head, at::Tensor& length,
                        const at::Tensor& rows, const at::Tensor& counts) {
  const char* op = "fifo_push";
  COMET_CHECK(!(at::GradMode::is_enabled() && (buffer.requires_grad() || rows.requires_grad())),
              op, "updates 'buffer' in place and is not differentiable, but 'buffer' or 'rows' "
              "requires grad; use fifo_push_functional (returns new tensors) for training, or "
              "call under torch.no_grad()");
  COMET_CHECK(!(buffer.is_inference() || head.is_inference() || length.is_inference()), op,
              "'buffer', 'head' or 'length' is an inference tensor (made under torch.inference_mode()), "
              "which may be written in place only under inference mode, as torch's own in-place ops "
              "refuse; clone it outside inference mode first");
  TORCH_CHECK_NOT_IMPLEMENTED(!has_tangent(buffer) && !has_tangent(rows), "comet::", op,
                              ": forward-mode AD is not supported: 'buffer' or 'rows' carries a "
                              "tangent");
  at::AutoDispatchBelowAutograd guard;
  call_push(buffer, head, length, rows, counts);
}

// ADInplaceOrView: the kernel, then the version bumps (under inference mode too, for
// tensors made outside it; inference tensors have no version counter and skip this key).
void fifo_push_inplace_or_view(at::Tensor& buffer, at::Tensor& head, at::Tensor& length,
                               const at::Tensor& rows, const at::Tensor& counts) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    call_push(buffer, head, length, rows, counts);
  }
  for (const at::Tensor* t : {&buffer, &head, &length}) {
    if (!t->is_inference()) torch::autograd::impl::bump_version(*t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, Autograd, m) { m.impl("fifo_push", &fifo_push_autograd); }
TORCH_LIBRARY_IMPL(comet, ADInplaceOrView, m) { m.impl("fifo_push", &fifo_push_inplace_or_view); }

}  // namespace comet
