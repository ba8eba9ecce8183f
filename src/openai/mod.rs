//! The OpenAI HTTP API as the gateway sees it: which paths are inference endpoints,
//! what a request body carries, and the error shape clients expect.

pub mod error;
pub mod json;
pub mod prompt;
pub mod request;

pub use error::ApiError;
pub use request::{ApiKind, ParsedRequest};
