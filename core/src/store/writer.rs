//! The group-commit writer: one thread owns the [`Store`](super::Store); concurrent
//! enqueues are batched into one transaction (one fsync). (Being built.)
