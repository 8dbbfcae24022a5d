//! History as values: the compressed encoding of series chunks (`codec`) and the
//! arithmetic of queries over them (`query`). No I/O: the series store in `runtime`
//! keeps the files, the WAL and the heads, and calls these.

pub mod codec;
pub mod query;
