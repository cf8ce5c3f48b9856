//! kyuu-turn
