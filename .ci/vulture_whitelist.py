# Names vulture cannot see used, each for a reason it cannot know (`vulture gradtrace .ci/vulture_whitelist.py`).
# Regenerate candidates with `vulture gradtrace --make-whitelist`; add a name here only with its reason.
# ruff: noqa
# fmt: off

# Verdict checks are registered by the @verdict decorator and run through the registry:
# .ci/run passes --ignore-decorators "@verdict", so new checks need no line here.

# Framework callbacks: transformers.TrainerCallback and Lightning's Callback call these by name.
_.on_train_start  # Lightning's Callback (gradtrace/integrations/lightning.py)
_.on_train_batch_start  # unused method (gradtrace/integrations/lightning.py:63)
batch_idx  # unused variable (gradtrace/integrations/lightning.py:63)
_.on_before_optimizer_step  # unused method (gradtrace/integrations/lightning.py:73)
_.on_train_end  # unused method (gradtrace/integrations/lightning.py:87)
_.on_exception  # unused method (gradtrace/integrations/lightning.py:90)
exception  # unused variable (gradtrace/integrations/lightning.py:90)
_.on_train_begin  # unused method (gradtrace/integrations/transformers.py:136)
control  # unused variable (gradtrace/integrations/transformers.py:136)
_.on_step_begin  # unused method (gradtrace/integrations/transformers.py:152)
control  # unused variable (gradtrace/integrations/transformers.py:152)
_.on_step_end  # unused method (gradtrace/integrations/transformers.py:159)
control  # unused variable (gradtrace/integrations/transformers.py:159)
_.on_log  # unused method (gradtrace/integrations/transformers.py:169)
control  # unused variable (gradtrace/integrations/transformers.py:169)
_.on_train_end  # unused method (gradtrace/integrations/transformers.py:174)
control  # unused variable (gradtrace/integrations/transformers.py:174)

# Signatures fixed by the caller (torch's Function/TorchFunctionMode/copy protocols, module hooks),
# public API entry points, and record fields read through storage and by users.
__getattr__  # unused function (gradtrace/__init__.py:29)
ctx  # unused variable (gradtrace/_torch_compat.py:173)
ctx  # unused variable (gradtrace/_torch_compat.py:177)
ctx  # unused variable (gradtrace/_torch_compat.py:196)
ctx  # unused variable (gradtrace/_torch_compat.py:202)
markdown_table  # unused function (gradtrace/analysis/registry.py:62)
memo  # unused variable (gradtrace/capture/hook_state.py:68)
rest  # unused variable (gradtrace/capture/hook_state.py:78)
_.__torch_unserializable__  # unused attribute (gradtrace/capture/hook_state.py:193)
types  # unused variable (gradtrace/capture/opcuts.py:208)
EXPECTED  # unused variable (gradtrace/demo.py:55)
_.trainable_upstream  # unused attribute (gradtrace/live.py:241)
gradtrace_flow  # unused function (gradtrace/pytest_plugin.py:13)
kept_grads  # unused variable (gradtrace/records.py:84)
trainable_upstream  # unused variable (gradtrace/records.py:242)
row_options  # unused variable (gradtrace/trace.py:183)
exc_type  # the context-manager protocol's __exit__ signature (gradtrace/integrations/transformers.py)
tb  # the same
check_figures_unknown  # unused function (gradtrace/analysis/wrapped.py): a registered verdict check
check_flat_params  # unused function (gradtrace/analysis/wrapped.py): a registered verdict check
DIGESTS  # unused variable (gradtrace/distributed.py): read by benchmarks/gather.py for the bytes it reports

# Issue 23 (hookless reading, forward wrappers): read by tests and benchmarks, or by the inspect module.
_.relearned  # HooklessRuns: how often hooks went back in (tests/test_hookless.py and benchmarks read it)
_.__wrapped__  # forward wrappers and their stand-ins on copies: inspect.signature follows it (module_calls.py)
