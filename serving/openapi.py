"""The app's OpenAPI document, written from the model's feature schema (served at `/openapi.json`).

Why by hand rather than FastAPI's generator: the handlers read raw JSON (orjson, column lists) for
speed, so FastAPI sees no body models and would publish empty operations. Here each operation's
body is the MLflow scoring protocol with this model's own input columns and types, so clients and
schemathesis (tests/serving/test_openapi.py) exercise what the server really accepts; every status
the server can answer is listed with the `{"error_code", "message"}` body.
"""

from __future__ import annotations

from typing import Any

from lifecycle.features import FeatureSchema
from lifecycle.spec import Task
from serving.requests import MAX_K

ERROR = {"type": "object", "required": ["error_code", "message"],
         "properties": {"error_code": {"type": "string"}, "message": {"type": "string"}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": "error", "content": {"application/json": {"schema": {"$ref":
            "#/components/schemas/Error"}}}} for code in codes}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _row(schema: FeatureSchema) -> dict[str, Any]:
    props: dict[str, Any] = {c: {"type": ["number", "null"]} for c in schema.numeric}
    props.update({c: {"type": ["string", "null"]} for c in schema.categorical})
    if schema.reads_text and schema.text_column:
        props[schema.text_column] = {"type": "string", "maxLength": 2000}
    return {"type": "object", "required": list(props), "properties": props}


def invocation_body(schema: FeatureSchema, max_rows: int) -> dict[str, Any]:
    """The four MLflow payload forms (dataframe_split, dataframe_records, instances, inputs) for this model."""
    row = _row(schema)
    rows = {"type": "array", "items": row, "maxItems": max_rows}
    columns = {"type": "object", "required": row["required"],
               "properties": {c: {"type": "array", "items": s, "maxItems": max_rows}
                              for c, s in row["properties"].items()}}
    split = {"type": "object", "required": ["columns", "data"], "properties": {
        "columns": {"type": "array", "items": {"type": "string"}, "const": row["required"]},
        "data": {"type": "array", "maxItems": max_rows, "items": {
            "type": "array", "prefixItems": list(row["properties"].values()),
            "minItems": len(row["required"]), "maxItems": len(row["required"])}}}}
    params = {"type": "object", "properties": {"probabilities": {"type": "boolean"}}}
    forms = {"dataframe_split": split, "dataframe_records": rows, "instances": rows, "inputs": columns}
    return {"oneOf": [{"type": "object", "required": [name], "additionalProperties": False,
                       "properties": {name: form, "params": params}} for name, form in forms.items()]}


def predictions(schema: FeatureSchema) -> dict[str, Any]:
    label: dict[str, Any] = ({"type": "number"} if schema.task is Task.regression
                             else {"type": "string", "enum": list(schema.classes)})
    item = {"type": "object", "required": ["prediction"], "properties": {"prediction": label},
            "additionalProperties": {"type": "number"}}
    return {"type": "object", "required": ["predictions"],
            "properties": {"predictions": {"type": "array", "items": item}}}


def search_body(columns: dict[str, str]) -> dict[str, Any]:
    scalar = {"string": {"type": "string", "maxLength": 200}, "integer": {"type": "integer"},
              "float": {"type": "number"}, "boolean": {"type": "boolean"}}
    conditions = {}
    for name, kind in columns.items():
        value = scalar[kind]
        ops = {op: value for op in ("eq", "ne", *(("gt", "gte", "lt", "lte") if kind != "boolean" else ()))}
        ops.update({op: {"type": "array", "items": value, "minItems": 1, "maxItems": 64} for op in ("in", "not_in")})
        conditions[name] = {"anyOf": [value, {"type": "null"}, {"type": "object", "properties": ops,
                                                                  "additionalProperties": False, "minProperties": 1}]}
    where = {"type": ["object", "null"], "properties": conditions, "additionalProperties": False}
    return {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": r"\S"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K}, "filter": where}}


def document(schema: FeatureSchema, max_rows: int, search_columns: dict[str, str] | None,
             with_token: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of one deployment (`search_columns` None: no index served)."""
    auth: list[dict[str, list[str]]] = [{"bearer": []}] if with_token else []
    secured = (401,) if with_token else ()
    health = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
    result = {"type": "object", "required": ["id", "text", "metadata", "_distance"],
              "properties": {"_distance": {"type": "number"}, "metadata": {"type": "object"}}}
    search_op: dict[str, Any] = {
        "summary": "Nearest indexed texts to a query, optionally filtered on metadata columns",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": search_body(search_columns or {})}}},
        "responses": {"200": _json({"type": "object", "required": ["results"], "properties": {
            "results": {"type": "array", "items": result}}}), **_errors(400, *secured, 413, 415, 503)}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "lifecycle serving", "version": "1"},
        "components": {"schemas": {"Error": ERROR},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": auth,
        "paths": {
            "/invocations": {"post": {
                "summary": "Predict (MLflow scoring protocol)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": invocation_body(schema, max_rows)}}},
                "responses": {"200": _json(predictions(schema)), **_errors(400, *secured, 413, 415)}}},
            "/search": {"post": search_op},
            "/health": {"get": {"security": [], "responses": {"200": _json(health)}}},
            "/ping": {"get": {"security": [], "responses": {"200": _json(health)}}},
            "/version": {"get": {"responses": {"200": _json({"type": "object", "required": ["deployment_id"]}),
                                               **_errors(*secured)}}},
            "/openapi.json": {"get": {"responses": {"200": _json({"type": "object"}), **_errors(*secured)}}},
        },
    }
