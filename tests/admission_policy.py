"""A ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) evaluated as the API server does, for
the tests of the shipped one (ops/k8s/publish/admissionpolicy.yaml).

Its CEL expressions run in CEL's reference runtime (``cel_expr_python``, Python bindings of cel-cpp,
a dev extra); the API server runs cel-go, which implements the same language. What is emulated is
the part of the admission plug-in the policy uses, in its order: ``matchConstraints`` (operation,
resource and subresource), ``matchConditions`` (any false: the policy is skipped), ``variables``
(each in order, under ``variables.<name>``), then every validation; an expression that errors
counts as a failure, as with ``failurePolicy: Fail``. ``request`` is the AdmissionRequest as JSON,
without its empty fields (``subResource`` is absent for the resource itself).

Not emulated: the type checking against the Pod schema (the server only warns), order-insensitive
equality of list-map and list-set fields (the tests never reorder a list), and the cost limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests.tools import require_module

Obj = dict[str, Any]


class CelError(Exception):
    """An expression did not compile, or evaluated to an error."""


@dataclass(frozen=True)
class Verdict:
    matched: bool  # the policy applies to the request (else it is admitted untouched)
    allowed: bool
    message: str | None = None  # the first failed validation's message
    reason: str | None = None  # its reason (Forbidden, Invalid, ...)


class AdmissionPolicy:
    """One policy, its expressions compiled once."""

    def __init__(self, policy: Mapping[str, Any]) -> None:
        self._cel = require_module("cel_expr_python.cel")
        spec = policy["spec"]
        self.name: str = policy["metadata"]["name"]
        self.fails_closed = spec.get("failurePolicy", "Fail") == "Fail"
        self._rules: list[Obj] = spec["matchConstraints"]["resourceRules"]
        dyn = self._cel.Type.DYN
        self._env = self._cel.NewEnv(variables={n: dyn for n in ("object", "oldObject", "request", "variables")})
        self._conditions = [self._compile(c["expression"]) for c in spec.get("matchConditions", [])]
        self._variables = [(v["name"], self._compile(v["expression"])) for v in spec.get("variables", [])]
        self._validations = [(self._compile(v["expression"]), v.get("message") or v["expression"],
                              v.get("reason", "Invalid")) for v in spec["validations"]]

    def _compile(self, expression: str) -> Any:
        try:
            return self._env.compile(expression)
        except RuntimeError as exc:
            raise CelError(f"{expression!r} does not compile: {exc}") from exc

    def _eval(self, expr: Any, data: Mapping[str, Any]) -> Any:
        value = expr.eval(data=data)
        if value.type() == self._cel.Type.ERROR:
            raise CelError(str(value.value()))
        return value.plain_value()

    def _matches_rules(self, operation: str, resource: str, subresource: str) -> bool:
        name = f"{resource}/{subresource}" if subresource else resource
        return any(operation in r["operations"] and "" in r["apiGroups"] and "v1" in r["apiVersions"]
                   and name in r["resources"] for r in self._rules)

    def review(self, *, username: str, old: Obj, new: Obj, operation: str = "UPDATE", resource: str = "pods",
               subresource: str = "") -> Verdict:
        """What the API server decides about ``username`` changing ``old`` into ``new``."""
        if not self._matches_rules(operation, resource, subresource):
            return Verdict(matched=False, allowed=True)
        request: Obj = {"operation": operation, "userInfo": {"username": username},
                        "resource": {"group": "", "version": "v1", "resource": resource},
                        "name": new["metadata"]["name"], "namespace": new["metadata"].get("namespace", "")}
        if subresource:
            request["subResource"] = subresource
        data: Obj = {"object": new, "oldObject": old, "request": request, "variables": {}}
        try:
            if not all(self._eval(c, data) is True for c in self._conditions):
                return Verdict(matched=False, allowed=True)
            variables: Obj = {}
            for name, expr in self._variables:
                variables[name] = self._eval(expr, {**data, "variables": variables})
            data["variables"] = variables
        except CelError as exc:
            return Verdict(matched=True, allowed=not self.fails_closed, message=f"error: {exc}")
        for expr, message, reason in self._validations:
            try:
                ok = self._eval(expr, data) is True
            except CelError as exc:
                ok, message = not self.fails_closed, f"{message} (error: {exc})"
            if not ok:
                return Verdict(matched=True, allowed=False, message=message, reason=reason)
        return Verdict(matched=True, allowed=True)
