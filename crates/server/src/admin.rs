//! Administration endpoints under `/v1/admin`: list contexts with their entry
//! counts, delete a whole context, server statistics. Open to the admin token
//! (`Authorization: Bearer`) or to a trusted client certificate whose subject is
//! listed with `--admin-subject`.

use crate::error::ApiError;
use crate::http::{Shared, caller};
use crate::service::Caller;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An authenticated administrator.
pub struct Admin(Caller);

impl FromRequestParts<Shared> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let caller = caller(state, parts, "admin");
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if state.service.is_admin(&caller, bearer) {
            Ok(Admin(caller))
        } else {
            let refused = Err::<(), _>(ApiError::AdminRequired);
            let audited = state
                .service
                .audit_admin(&caller, "admin", None, refused)
                .await;
            Err(audited.expect_err("auditing a refusal keeps it a refusal"))
        }
    }
}

/// `GET /v1/admin/contexts`: every context with its number of entries.
pub async fn contexts(
    State(state): State<Shared>,
    Admin(caller): Admin,
) -> Result<Response, ApiError> {
    let result = state.service.contexts().await;
    let contexts = state
        .service
        .audit_admin(&caller, "list_contexts", None, result)
        .await?;
    let body: Vec<_> = contexts
        .into_iter()
        .map(|(context, entries)| json!({"context": context, "entries": entries}))
        .collect();
    Ok(Json(json!({"contexts": body})).into_response())
}

/// `DELETE /v1/admin/contexts/{context}`: deletes every entry of a context.
pub async fn delete_context(
    State(state): State<Shared>,
    Admin(caller): Admin,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let context = p
        .map(|Path(c)| c)
        .map_err(|e| ApiError::BadRequest(format!("invalid path: {}", e.body_text())))?;
    let result = state.service.delete_context(&context).await;
    let deleted = state
        .service
        .audit_admin(&caller, "delete_context", Some(&context), result)
        .await?;
    Ok(Json(json!({"context": context, "deleted": deleted})).into_response())
}

/// `GET /v1/admin/stats`: server statistics.
pub async fn stats(
    State(state): State<Shared>,
    Admin(caller): Admin,
) -> Result<Response, ApiError> {
    let result = state.service.stats().await;
    let stats = state
        .service
        .audit_admin(&caller, "stats", None, result)
        .await?;
    Ok(Json(json!({"version": env!("CARGO_PKG_VERSION"), "stats": stats})).into_response())
}
