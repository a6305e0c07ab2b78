"""Pure attribution algorithms: numpy, onnxruntime and shap only; no gRPC, Redis or globals."""

from explainers.base import Background, Budget, Estimator, Evaluator, Explanation, ModelFn
from explainers.registry import build_registry, lookup

__all__ = ["Background", "Budget", "Estimator", "Evaluator", "Explanation", "ModelFn",
           "build_registry", "lookup"]
