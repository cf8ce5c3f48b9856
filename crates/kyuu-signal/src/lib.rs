//! kyuu-signal
