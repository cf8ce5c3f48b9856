//! A small sans-IO TURN client (placeholder; filled in below).
