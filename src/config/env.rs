//! `TIERGATE_<SECTION>_<KEY>` environment variables, laid over the file as a TOML table before
//! the whole is deserialized, so they pass the same checks as the file.
//!
//! Nothing here lists the keys: which sections exist and whether a key takes a boolean, a number
//! or a list is asked of the serde structs themselves ([`shape_at`]). A key that does not exist
//! goes through as text and is refused by `deny_unknown_fields`; the caller names the variable.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

use super::{err, Config, ConfigError};

/// Lays the `TIERGATE_<SECTION>_<KEY>` variables of `env` over `doc`; returns, for each dotted
/// key set, the variable that set it, so errors can name the variable.
pub fn overlay(
    doc: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let Some(Shape::Table(fields)) = shape_at::<Config>(&[]) else { unreachable!("Config is a struct") };
    let sections: Vec<&str> =
        fields.iter().copied().filter(|f| matches!(shape_at::<Config>(&[*f]), Some(Shape::Table(_)))).collect();
    let mut origins = BTreeMap::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("TIERGATE_") else { continue };
        let Some(section) =
            sections.iter().find(|s| rest.strip_prefix(&s.to_ascii_uppercase()).is_some_and(|r| r.starts_with('_')))
        else {
            continue; // Not a config section (e.g. TIERGATE_LOG).
        };
        let key = rest[section.len() + 1..].to_ascii_lowercase();
        // Kubernetes service links name a Service `tiergate-store` TIERGATE_STORE_SERVICE_HOST,
        // TIERGATE_STORE_PORT_…: not config, and no reason to refuse to start.
        if key.starts_with("service_") || key == "port" || key.starts_with("port_") {
            continue;
        }
        let parsed = match shape_at::<Config>(&[*section, &key]) {
            Some(Shape::Bool) => toml::Value::Boolean(value.parse().map_err(|_| err(&name, "expected true or false"))?),
            Some(Shape::Number) => match (value.parse::<i64>(), value.parse::<f64>()) {
                (Ok(n), _) => toml::Value::Integer(n),
                (_, Ok(x)) => toml::Value::Float(x),
                _ => return Err(err(&name, "expected a number")),
            },
            Some(Shape::List) => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            ),
            Some(Shape::Table(_)) => {
                return Err(err(&name, format!("[{section}.{key}] is a table; set its keys in the file")))
            }
            // Text, or a key that does not exist, which deserializing refuses.
            Some(Shape::Text) | None => toml::Value::String(value),
        };
        let table = doc
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| err(*section, "must be a table"))?;
        origins.insert(format!("{section}.{key}"), name);
        table.insert(key, parsed);
    }
    Ok(origins)
}

/// What a config value is, as its `Deserialize` impl asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Bool,
    Number,
    List,
    /// A struct, with its field names.
    Table(&'static [&'static str]),
    /// Strings, durations, addresses, enums and anything else read from text.
    Text,
}

/// The shape of the value at `path` (field names from the top) within `T`, or `None` when there is
/// no such field. Found by deserializing `T` from a probe that follows `path` and stops, with an
/// error, at the first request for a value at its end.
pub fn shape_at<T: DeserializeOwned>(path: &[&str]) -> Option<Shape> {
    let found = Cell::new(None);
    // The probe always ends in an error: what matters is what it saw on the way.
    let _ = T::deserialize(Probe { path, found: &found });
    found.get()
}

#[derive(Clone, Copy)]
struct Probe<'a> {
    path: &'a [&'a str],
    found: &'a Cell<Option<Shape>>,
}

impl Probe<'_> {
    fn found<T>(self, shape: Shape) -> Result<T, de::value::Error> {
        if self.path.is_empty() {
            self.found.set(Some(shape));
        }
        Err(de::Error::custom("probed"))
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        self.found(Shape::Text)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        self.found(Shape::Bool)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        self.found(Shape::Number)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        self.found(Shape::List)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &str, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.path.split_first() {
            None => self.found(Shape::Table(fields)),
            Some((key, rest)) => visitor.visit_map(OneField { key: Some(key), value: Probe { path: rest, ..self } }),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(v)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_seq(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _: &str, _: usize, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_seq(v)
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.deserialize_struct("", &[], v)
    }

    serde::forward_to_deserialize_any! {
        char str string bytes byte_buf unit unit_struct enum identifier ignored_any
    }
}

/// A map of one field, whose value is the probe for the rest of the path.
struct OneField<'a> {
    key: Option<&'a str>,
    value: Probe<'a>,
}

impl<'de> MapAccess<'de> for OneField<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        match self.key.take() {
            Some(key) => seed.deserialize(IntoDeserializer::<de::value::Error>::into_deserializer(key)).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        seed.deserialize(self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_come_from_the_serde_structs() {
        assert!(matches!(shape_at::<Config>(&[]), Some(Shape::Table(f)) if f.contains(&"store")));
        assert_eq!(shape_at::<Config>(&["portfolios"]), Some(Shape::List));
        assert_eq!(shape_at::<Config>(&["store", "cluster"]), Some(Shape::Bool));
        assert_eq!(shape_at::<Config>(&["store", "sentinels"]), Some(Shape::List));
        assert_eq!(shape_at::<Config>(&["store", "hash_key"]), Some(Shape::Text));
        assert_eq!(shape_at::<Config>(&["store", "timeout"]), Some(Shape::Text));
        assert_eq!(shape_at::<Config>(&["server", "grpc_listen"]), Some(Shape::Text));
        assert_eq!(shape_at::<Config>(&["policy", "scope"]), Some(Shape::Text));
        assert_eq!(shape_at::<Config>(&["policy", "ladder"]), Some(Shape::Text));
        assert_eq!(shape_at::<Config>(&["policy", "legacy_threshold"]), Some(Shape::Number));
        assert_eq!(shape_at::<Config>(&["policy", "reserve"]), Some(Shape::Table(&["marketing"])));
        assert_eq!(shape_at::<Config>(&["store", "urll"]), None);
        assert_eq!(shape_at::<Config>(&["log"]), None);
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(None, pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn values_take_the_shape_of_their_key() {
        let c = load(&[
            ("TIERGATE_POLICY_LEGACY_THRESHOLD", "2"),
            ("TIERGATE_STORE_SENTINELS", "s1:26379, s2:26379,"),
            ("TIERGATE_STORE_KEY_PREFIX", "123"),
            ("TIERGATE_SERVER_SHUTDOWN_GRACE", "3s"),
        ])
        .unwrap();
        assert_eq!(c.policy.legacy_threshold, 2.0);
        assert_eq!(c.store.sentinels, ["s1:26379", "s2:26379"]);
        assert_eq!(c.store.key_prefix, "123");
        assert_eq!(c.server.shutdown_grace, std::time::Duration::from_secs(3));
    }

    #[test]
    fn bad_values_name_their_variable_without_quoting_it() {
        for (name, value) in [
            ("TIERGATE_STORE_CLUSTER", "maybe-secret"),
            ("TIERGATE_POLICY_LEGACY_THRESHOLD", "maybe-secret"),
            ("TIERGATE_POLICY_RESERVE", "maybe-secret"),
            ("TIERGATE_STORE_", "maybe-secret"),
        ] {
            let e = load(&[(name, value)]).unwrap_err();
            assert_eq!(e.key, name);
            assert!(!e.to_string().contains("maybe-secret"), "{e}");
        }
        assert_eq!(load(&[("TIERGATE_POLICY_WINDOW", "soon")]).unwrap_err().key, "TIERGATE_POLICY_WINDOW");
        // Not sections: the list of portfolios, and variables of the binary itself.
        assert!(load(&[("TIERGATE_PORTFOLIOS_X", "1"), ("TIERGATE_LOG", "debug")]).is_ok());
    }
}
