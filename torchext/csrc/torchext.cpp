// libtorch operations that tch's C API does not expose, behind a C ABI that
// never lets a C++ exception cross into Rust: every function returns null on
// success or a malloc'd message (freed by torchext_free_error).
//
// A tch `Tensor` holds a pointer to a heap `at::Tensor`; the Rust side passes
// those pointers here, and tensors this file makes are handed back the same
// way (`new at::Tensor`, owned by the Rust `Tensor` from then on).

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace {

char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

std::vector<at::Tensor> tensors(at::Tensor* const* ptrs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*ptrs[i]);
  }
  return out;
}

// Calls back into Rust once a leaf tensor's gradient has been accumulated
// into its `.grad`; `drop` releases the Rust closure when autograd drops the
// hook (with the tensor, or when it is replaced).
struct RustGradReadyHook : torch::autograd::PostAccumulateGradHook {
  void (*call)(void*);
  void (*drop)(void*);
  void* data;
  RustGradReadyHook(void (*call)(void*), void (*drop)(void*), void* data)
      : call(call), drop(drop), data(data) {}
  void operator()(const torch::autograd::Variable&) override { call(data); }
  ~RustGradReadyHook() override { drop(data); }
};

// The fused kernel walks each tensor's memory by the parameter's element
// count without checking its companions: a gradient or moment of another
// shape, dtype or device, or one not contiguous, would be read out of bounds.
void check_like_params(const std::vector<at::Tensor>& params,
                       const std::vector<at::Tensor>& others,
                       const char* what) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& o = others[i];
    TORCH_CHECK(p.is_contiguous() && o.is_contiguous(), "tensor ", i, ": the parameter and its ", what, " must be contiguous");
    TORCH_CHECK(o.sizes() == p.sizes() && o.scalar_type() == p.scalar_type() && o.device() == p.device(),
                "tensor ", i, ": its ", what, " is ", o.scalar_type(), o.sizes(), " on ", o.device(),
                ", the parameter ", p.scalar_type(), p.sizes(), " on ", p.device());
  }
}

}  // namespace

#define TORCHEXT_GUARD(body)                          \
  try {                                               \
    body;                                             \
    return nullptr;                                   \
  } catch (const c10::Error& e) {                     \
    return copy_message(e.what_without_backtrace());  \
  } catch (const std::exception& e) {                 \
    return copy_message(e.what());                    \
  } catch (...) {                                     \
    return copy_message("unknown C++ exception");     \
  }

extern "C" {

void torchext_free_error(char* message) { std::free(message); }

// at::_fused_adamw_ (amsgrad and maximize off, no grad scaler), the kernel
// behind torch.optim.AdamW(fused=True). `steps` hold each parameter's step
// count after this step, as torch's optimizer increments them before the
// kernel runs.
char* torchext_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                           at::Tensor* const* exp_avgs,
                           at::Tensor* const* exp_avg_sqs,
                           at::Tensor* const* steps, size_t n, double lr,
                           double beta1, double beta2, double weight_decay,
                           double eps) {
  TORCHEXT_GUARD({
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> p = tensors(params, n);
    std::vector<at::Tensor> g = tensors(grads, n);
    std::vector<at::Tensor> m = tensors(exp_avgs, n);
    std::vector<at::Tensor> v = tensors(exp_avg_sqs, n);
    std::vector<at::Tensor> s = tensors(steps, n);
    check_like_params(p, g, "gradient");
    check_like_params(p, m, "exp_avg");
    check_like_params(p, v, "exp_avg_sq");
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(s[i].numel() == 1 && s[i].scalar_type() == at::kFloat,
                  "tensor ", i, ": its step must be one fp32 element");
    }
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  })
}

// at::_foreach_norm (L2, fp32 results): one norm per tensor, written to `out`.
char* torchext_foreach_norm(at::Tensor* const* inputs, size_t n,
                            at::Tensor** out) {
  TORCHEXT_GUARD({
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> norms =
        at::_foreach_norm(tensors(inputs, n), 2, at::kFloat);
    for (size_t i = 0; i < n; ++i) {
      out[i] = new at::Tensor(std::move(norms[i]));
    }
  })
}

// at::_foreach_mul_ by a scalar held in a zero-dimension tensor, in place.
char* torchext_foreach_mul_(at::Tensor* const* inputs, size_t n,
                            const at::Tensor* scale) {
  TORCHEXT_GUARD({
    at::NoGradGuard no_grad;
    at::_foreach_mul_(tensors(inputs, n), *scale);
  })
}

// Sets (replacing any) the hook that runs after autograd accumulates a
// gradient into `leaf.grad`. On failure the closure is released here.
char* torchext_set_grad_ready_hook(const at::Tensor* leaf, void (*call)(void*),
                                   void (*drop)(void*), void* data) {
  try {
    TORCH_CHECK(leaf->requires_grad() && leaf->is_leaf(),
                "a gradient-ready hook needs a leaf tensor that requires grad");
    torch::autograd::impl::set_post_acc_grad_hooks(
        *leaf, std::make_unique<RustGradReadyHook>(call, drop, data));
    return nullptr;
  } catch (const c10::Error& e) {
    drop(data);
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    drop(data);
    return copy_message(e.what());
  } catch (...) {
    drop(data);
    return copy_message("unknown C++ exception");
  }
}

// Removes the hook torchext_set_grad_ready_hook set, if any.
char* torchext_clear_grad_ready_hook(const at::Tensor* leaf) {
  TORCHEXT_GUARD({
    torch::autograd::impl::set_post_acc_grad_hooks(*leaf, nullptr);
  })
}

// Drops `leaf`'s gradient (torch's zero_grad(set_to_none=True)): the next
// backward hands the leaf its incoming gradient instead of adding it to a
// zeroed buffer.
char* torchext_drop_grad(const at::Tensor* leaf) {
  TORCHEXT_GUARD({ leaf->mutable_grad().reset(); })
}

// Autocast on `cuda` (else the CPU) in `dtype` (0: fp16, 1: bf16), nested:
// the previous state goes to `prev_enabled` and `prev_dtype` for
// torchext_autocast_exit. tch's own autocast sets CUDA's flag only and so
// keeps libtorch's default dtype, fp16.
char* torchext_autocast_enter(int cuda, int dtype, int* prev_enabled,
                              int* prev_dtype) {
  TORCHEXT_GUARD({
    at::DeviceType device = cuda ? at::kCUDA : at::kCPU;
    *prev_enabled = at::autocast::is_autocast_enabled(device) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_dtype(device, dtype ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::increment_nesting();
  })
}

// Restores what torchext_autocast_enter saved; the cast-weight cache is
// cleared when the outermost autocast region ends.
char* torchext_autocast_exit(int cuda, int prev_enabled, int prev_dtype) {
  TORCHEXT_GUARD({
    at::DeviceType device = cuda ? at::kCUDA : at::kCPU;
    at::autocast::set_autocast_enabled(device, prev_enabled != 0);
    at::autocast::set_autocast_dtype(device,
                                     static_cast<at::ScalarType>(prev_dtype));
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
  })
}

// A CPU uint8 tensor of `len` bytes in page-locked memory (through the
// CUDA host allocator, which keeps freed blocks for reuse), into `out`.
char* torchext_pinned_bytes(int64_t len, at::Tensor** out) {
  TORCHEXT_GUARD({
    *out = new at::Tensor(at::empty(
        {len}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
  })
}

// Loads libtorch_cuda.so from the folder of the libtorch_cpu.so this
// process runs, once, with its symbols global: its static initialisers
// register CUDA with libtorch. The linker drops it from binaries (they
// reference none of its symbols, and Rust links with --as-needed), so
// without this call libtorch sees no GPU. `*loaded` is 0 when that folder
// has no libtorch_cuda.so (a CPU-only libtorch), 1 once it is loaded.
char* torchext_load_cuda(int* loaded) {
  *loaded = 0;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::globalContext), &info) == 0 ||
      info.dli_fname == nullptr) {
    return copy_message("cannot find the file libtorch_cpu was loaded from");
  }
  std::string path(info.dli_fname);
  size_t slash = path.rfind('/');
  std::string cuda =
      (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) +
      "/libtorch_cuda.so";
  if (access(cuda.c_str(), F_OK) != 0) {
    return nullptr;
  }
  if (dlopen(cuda.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    return copy_message(why != nullptr ? why : cuda.c_str());
  }
  *loaded = 1;
  return nullptr;
}

}  // extern "C"
