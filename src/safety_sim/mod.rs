//! A safety service simulator speaking Model Armor's REST shape, for tests and the
//! demo: `POST /v1/projects/{p}/locations/{l}/templates/{t}:sanitizeUserPrompt`
//! and `:sanitizeModelResponse`, with verdicts from keyword and regex rules
//! ([`rules`]) and switches to be slow, fail, hang or answer garbage ([`server`]).

pub mod rules;
pub mod server;

pub use rules::Rules;
pub use server::{router, serve, Behaviour, Mode, SafetySimConfig};
