//! Values that cross the store boundary: parameters (`ToValue`) and row cells (`FromValue`),
//! the same five types on both backends.

use crate::error::{Error, Result};

/// The portable column and parameter types. On SQLite: INTEGER, REAL, TEXT, BLOB (a `Bool`
/// parameter is the INTEGER 0 or 1); on PostgreSQL: BIGINT, DOUBLE PRECISION, TEXT, BYTEA,
/// BOOLEAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int,
    Real,
    Text,
    Blob,
    Bool,
}

impl Ty {
    pub fn name(self) -> &'static str {
        match self {
            Self::Int => "an integer",
            Self::Real => "a real",
            Self::Text => "text",
            Self::Blob => "a blob",
            Self::Bool => "a boolean",
        }
    }
}

/// One parameter or cell. A NULL keeps the type it stands for (PostgreSQL types every
/// parameter; `?1 IS NULL` works on both backends because of it).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null(Ty),
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
    Bool(bool),
}

impl Value {
    pub fn ty(&self) -> Ty {
        match self {
            Self::Null(t) => *t,
            Self::Int(_) => Ty::Int,
            Self::Real(_) => Ty::Real,
            Self::Text(_) => Ty::Text,
            Self::Blob(_) => Ty::Blob,
            Self::Bool(_) => Ty::Bool,
        }
    }

    fn found(&self) -> &'static str {
        match self {
            Self::Null(_) => "NULL",
            other => other.ty().name(),
        }
    }
}

/// A Rust value usable as a parameter.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

/// The portable type a Rust type binds as (what its `None` is a NULL of).
pub trait Typed {
    const TY: Ty;
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
        }
        impl Typed for $t {
            const TY: Ty = Ty::Int;
        }
    )*};
}
int_value!(i64, i32, i16, i8, u32, u16, u8);

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl Typed for f64 {
    const TY: Ty = Ty::Real;
}
impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}
impl Typed for bool {
    const TY: Ty = Ty::Bool;
}
impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl Typed for str {
    const TY: Ty = Ty::Text;
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl Typed for String {
    const TY: Ty = Ty::Text;
}
impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl Typed for [u8] {
    const TY: Ty = Ty::Blob;
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl Typed for Vec<u8> {
    const TY: Ty = Ty::Blob;
}
impl<const N: usize> ToValue for [u8; N] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl<const N: usize> Typed for [u8; N] {
    const TY: Ty = Ty::Blob;
}
impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: Typed + ?Sized> Typed for &T {
    const TY: Ty = T::TY;
}
impl<T: ToValue + Typed> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null(T::TY),
        }
    }
}

/// A cell read into a Rust value.
pub trait FromValue: Sized {
    fn from_value(v: &Value, column: usize) -> Result<Self>;
}

fn mismatch(v: &Value, column: usize, expected: Ty) -> Error {
    Error::Type {
        column,
        expected: expected.name(),
        found: v.found(),
    }
}

impl FromValue for i64 {
    fn from_value(v: &Value, column: usize) -> Result<Self> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(i64::from(*b)),
            other => Err(mismatch(other, column, Ty::Int)),
        }
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value, column: usize) -> Result<Self> {
        match v {
            Value::Real(r) => Ok(*r),
            // SQLite hands back an integral REAL expression (`COALESCE(SUM(x), 0)`) as an
            // integer; a real column read as f64 accepts it on both backends.
            #[allow(
                clippy::cast_precision_loss,
                reason = "an integer read as a real, as SQL itself converts it"
            )]
            Value::Int(i) => Ok(*i as f64),
            other => Err(mismatch(other, column, Ty::Real)),
        }
    }
}
impl FromValue for bool {
    fn from_value(v: &Value, column: usize) -> Result<Self> {
        match v {
            Value::Bool(b) => Ok(*b),
            Value::Int(i) => Ok(*i != 0),
            other => Err(mismatch(other, column, Ty::Bool)),
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value, column: usize) -> Result<Self> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(mismatch(other, column, Ty::Text)),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value, column: usize) -> Result<Self> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(mismatch(other, column, Ty::Blob)),
        }
    }
}
impl FromValue for Value {
    fn from_value(v: &Value, _column: usize) -> Result<Self> {
        Ok(v.clone())
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value, column: usize) -> Result<Self> {
        match v {
            Value::Null(_) => Ok(None),
            other => T::from_value(other, column).map(Some),
        }
    }
}

/// One result row: its cells in column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    pub(crate) fn new(values: Vec<Value>) -> Self {
        Self { values }
    }

    /// Cell `i` (0-based) as `T`; a type mismatch is an error naming the column.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T> {
        let v = self.values.get(i).ok_or(Error::NoColumn(i))?;
        T::from_value(v, i)
    }

    /// The cells, in column order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    pub fn into_values(self) -> Vec<Value> {
        self.values
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Parameters for [`crate::Conn`] methods: `params![a, b, c]`.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::ToValue] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::ToValue),+] as &[&dyn $crate::ToValue] };
}
