//! Error mapping: what the database refused is Invalid (never retried); everything
//! else (timeouts, overload, unavailable replicas, broken connections) is Unavailable.

use scylla::errors::{
    DbError, ExecutionError, NewSessionError, NextPageError, NextRowError, PagerExecutionError,
    PrepareError, RequestAttemptError, RequestError,
};

use crate::store::StoreError;

pub(super) fn db_error(e: &DbError) -> bool {
    matches!(
        e,
        DbError::SyntaxError
            | DbError::Invalid
            | DbError::AlreadyExists { .. }
            | DbError::FunctionFailure { .. }
            | DbError::AuthenticationError
            | DbError::Unauthorized
            | DbError::ConfigError
    )
}

pub(super) fn exec_error(e: ExecutionError) -> StoreError {
    let invalid = match &e {
        ExecutionError::BadQuery(_) => true,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => db_error(db),
        ExecutionError::LastAttemptError(RequestAttemptError::SerializationError(_)) => true,
        ExecutionError::PrepareError(p) => prepare_is_invalid(p),
        _ => false,
    };
    classify(invalid, e)
}

pub(super) fn prepare_error(e: PrepareError) -> StoreError {
    classify(prepare_is_invalid(&e), e)
}

/// A statement the server refused to prepare is invalid; anything else may pass on
/// a retry.
pub(super) fn prepare_is_invalid(e: &PrepareError) -> bool {
    matches!(
        e,
        PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(db, _)
        } if db_error(db)
    )
}

/// Invalid requests are never retried; everything else is.
pub(super) fn classify(invalid: bool, e: impl std::fmt::Display) -> StoreError {
    if invalid {
        StoreError::Invalid(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

pub(super) fn request_error(e: RequestError) -> StoreError {
    exec_error(e.into_execution_error())
}

pub(super) fn page_error(e: NextPageError) -> StoreError {
    match e {
        NextPageError::RequestFailure(r) => request_error(r),
        other => StoreError::Corrupt(other.to_string()),
    }
}

pub(super) fn pager_error(e: PagerExecutionError) -> StoreError {
    match e {
        PagerExecutionError::PrepareError(p) => prepare_error(p),
        PagerExecutionError::SerializationError(s) => StoreError::Invalid(s.to_string()),
        PagerExecutionError::NextPageError(n) => page_error(n),
        other => StoreError::Unavailable(other.to_string()),
    }
}

pub(super) fn row_error(e: NextRowError) -> StoreError {
    match e {
        NextRowError::NextPageError(n) => page_error(n),
        other => StoreError::Corrupt(other.to_string()),
    }
}

pub(super) fn session_error(e: NewSessionError) -> StoreError {
    StoreError::Unavailable(format!("cannot connect to ScyllaDB: {e}"))
}

pub(super) fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}
