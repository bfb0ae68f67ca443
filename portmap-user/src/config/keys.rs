//! The keys of the config file, as serde_derive names them: `Startup`'s and `Live`'s fields are
//! the whole list (a new setting is one field in one of them), unknown keys are refused with
//! the parser's position, and a reload names the startup keys that changed.

use std::sync::OnceLock;

use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, IgnoredAny, Visitor},
};

use super::{Live, Startup};

/// The field names `T`'s derived `Deserialize` asks for (what it passes to `deserialize_struct`).
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Recorder<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Recorder<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("only structs are recorded"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Recorder(&mut fields));
    fields
}

/// Every top-level key of the config file: the startup keys, then the live ones.
pub fn known_keys() -> &'static [&'static str] {
    static KEYS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = field_names::<Startup>().to_vec();
        keys.extend_from_slice(field_names::<Live>());
        keys
    })
}

/// A top-level key, accepted only if it is known: the error comes from inside the parser, which
/// adds where the key stands (the TOML line, the JSON line and column).
struct KnownKey;

impl<'de> Deserialize<'de> for KnownKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let key = String::deserialize(deserializer)?;
        if known_keys().contains(&key.as_str()) {
            Ok(Self)
        } else {
            Err(de::Error::unknown_field(&key, known_keys()))
        }
    }
}

/// Fails on the first top-level key that is neither a startup nor a live setting.
pub fn check<'de, D: Deserializer<'de>>(document: D) -> Result<(), D::Error> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a table of settings")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while map.next_key::<KnownKey>()?.is_some() {
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    document.deserialize_map(Keys)
}

/// The startup keys whose values differ between `old` and `new` (compared as serde writes them).
#[must_use]
pub fn startup_changes(old: &Startup, new: &Startup) -> Vec<&'static str> {
    let (Ok(old), Ok(new)) = (as_table(old), as_table(new)) else {
        return Vec::new();
    };
    field_names::<Startup>()
        .iter()
        .copied()
        .filter(|key| old.get(*key) != new.get(*key))
        .collect()
}

fn as_table(value: &impl Serialize) -> serde_json::Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(value)? {
        serde_json::Value::Object(map) => Ok(map),
        _ => Ok(serde_json::Map::new()),
    }
}
