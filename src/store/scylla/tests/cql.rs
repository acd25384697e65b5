//! A small reader of `cql/schema.cql` and of the statements' text: each table's
//! column types, and each statement's bind markers and result columns, as a live
//! server's prepared-statement metadata would give them.

use std::collections::HashMap;

use scylla::deserialize::row::DeserializeRow;
use scylla::frame::response::result::{
    CollectionType, ColumnSpec, ColumnType, NativeType, TableSpec,
};
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;

// The settings and constants the schema is filled from, as the tests use them.
use super::*;

pub(super) fn schema() -> HashMap<String, HashMap<String, ColumnType<'static>>> {
    let settings = ScyllaSettings {
        nodes: vec![],
        keyspace: KS.into(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: Consistency::One,
        retention: Retention::default(),
        batch_max_bytes: 5120,
        write_concurrency: 1,
        request_timeout: Duration::from_secs(1),
        page_size: 100,
        local_datacenter: None,
        bucket_len_ms: 3_600_000,
        rollup_sweep_after: Duration::from_secs(300),
        rollup_backlog_max: 1_000,
    };
    let mut tables = HashMap::new();
    for stmt in schema_statements(&settings) {
        let Some(rest) = stmt.strip_prefix(&format!("CREATE TABLE IF NOT EXISTS {KS}.")) else {
            continue;
        };
        let (name, rest) = rest.split_once('(').expect("a column list");
        let body = &rest[..closing_paren(rest)];
        let mut columns = HashMap::new();
        for def in split_top_level(body) {
            let def = def.trim();
            if def.starts_with("PRIMARY KEY") {
                continue;
            }
            let def = def.trim_end_matches("PRIMARY KEY").trim();
            let (col, typ) = def.split_once(char::is_whitespace).expect("name and type");
            columns.insert(col.to_owned(), parse_type(typ.trim()));
        }
        tables.insert(name.trim().to_owned(), columns);
    }
    tables
}

/// Index of the `)` that closes a list whose `(` was just consumed.
pub(super) fn closing_paren(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return i,
            ')' => depth -= 1,
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {s}")
}

/// Splits on commas outside `<>` and `()`.
pub(super) fn split_top_level(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '<' | '(' => depth += 1,
            '>' | ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

pub(super) fn parse_type(s: &str) -> ColumnType<'static> {
    let s = s.trim();
    let inner = |prefix: &str| s.strip_prefix(prefix).and_then(|r| r.strip_suffix('>'));
    if let Some(t) = inner("frozen<") {
        return match parse_type(t) {
            ColumnType::Collection { typ, .. } => ColumnType::Collection { frozen: true, typ },
            other => other,
        };
    }
    if let Some(t) = inner("map<") {
        let kv = split_top_level(t);
        let typ = CollectionType::Map(Box::new(parse_type(kv[0])), Box::new(parse_type(kv[1])));
        return ColumnType::Collection { frozen: false, typ };
    }
    if let Some(t) = inner("set<") {
        let typ = CollectionType::Set(Box::new(parse_type(t)));
        return ColumnType::Collection { frozen: false, typ };
    }
    if let Some(t) = inner("list<") {
        let typ = CollectionType::List(Box::new(parse_type(t)));
        return ColumnType::Collection { frozen: false, typ };
    }
    ColumnType::Native(match s {
        "bigint" => NativeType::BigInt,
        "int" => NativeType::Int,
        "uuid" => NativeType::Uuid,
        "timeuuid" => NativeType::Timeuuid,
        "timestamp" => NativeType::Timestamp,
        "text" | "varchar" => NativeType::Text,
        "ascii" => NativeType::Ascii,
        "double" => NativeType::Double,
        "float" => NativeType::Float,
        "boolean" => NativeType::Boolean,
        "blob" => NativeType::Blob,
        other => panic!("type {other} is not known to this test; add it"),
    })
}

pub(super) fn tokens(cql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = cql.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let word =
            |j: usize| chars[j].is_ascii_alphanumeric() || chars[j] == '_' || chars[j] == '.';
        if c.is_whitespace() {
            i += 1;
        } else if c == ':' || word(i) {
            let start = i;
            i += 1;
            while i < chars.len() && word(i) {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == '\'' {
            let start = i;
            i += 1;
            while chars[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push(chars[start..i].iter().collect());
        } else if (c == '>' || c == '<') && chars.get(i + 1) == Some(&'=') {
            out.push(format!("{c}="));
            i += 2;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

pub(super) fn is_marker(t: &str) -> bool {
    t == "?" || t.starts_with(':')
}

pub(super) fn is_op(t: &str) -> bool {
    matches!(t, "=" | "<" | ">" | "<=" | ">=")
}

/// The bind-marker specs and result-column specs of a statement, from the schema.
pub(super) fn specs(cql: &str) -> (Vec<ColumnSpec<'static>>, Vec<ColumnSpec<'static>>) {
    let schema = schema();
    let t = tokens(cql);
    let table_of = |tok: &str| {
        tok.strip_prefix(&format!("{KS}."))
            .expect("qualified")
            .to_owned()
    };
    let pos = |word: &str| t.iter().position(|x| x.eq_ignore_ascii_case(word));
    let table = match t[0].to_ascii_uppercase().as_str() {
        "INSERT" => table_of(&t[2]),
        "UPDATE" => table_of(&t[1]),
        "SELECT" | "DELETE" => table_of(&t[pos("FROM").unwrap() + 1]),
        other => panic!("unexpected statement {other}"),
    };
    let cols = schema
        .get(&table)
        .unwrap_or_else(|| panic!("table {table} is not in cql/schema.cql"));
    let spec = |name: &str, col: &str| {
        let typ = cols
            .get(col)
            .unwrap_or_else(|| panic!("column {table}.{col} is not in cql/schema.cql"))
            .clone();
        bind_spec(name, typ, &table)
    };
    let marker_name = |m: &str, col: &str| m.strip_prefix(':').unwrap_or(col).to_owned();
    let mut binds = Vec::new();
    let mut results = Vec::new();
    if t[0].eq_ignore_ascii_case("INSERT") {
        let values = pos("VALUES").unwrap();
        let using = pos("USING").unwrap_or(t.len());
        let columns: Vec<&String> = t[4..values - 1].iter().filter(|x| *x != ",").collect();
        let markers: Vec<&String> = t[values + 2..using]
            .iter()
            .filter(|x| is_marker(x))
            .collect();
        assert_eq!(columns.len(), markers.len(), "{cql}");
        for (c, m) in columns.iter().zip(markers) {
            binds.push(spec(&marker_name(m, c), c));
        }
        binds.extend(using_binds(cql, &t[using..], &table));
    } else {
        if t[0].eq_ignore_ascii_case("SELECT") {
            let from = pos("FROM").unwrap();
            for c in t[1..from].iter().filter(|x| *x != ",") {
                results.push(spec(c, c));
            }
        }
        if t[0].eq_ignore_ascii_case("UPDATE") {
            let (set, wher) = (pos("SET").unwrap(), pos("WHERE").unwrap());
            binds.extend(using_binds(cql, &t[2..set], &table));
            // `SET a = :a, b = b + :b, m[?] = ?`: each marker binds the column
            // assigned, or its map's key type inside the brackets and its value
            // type after them.
            let (mut column, mut element) = ("", false);
            for k in set + 1..wher {
                if t[k + 1] == "[" {
                    (column, element) = (&t[k], true);
                } else if t[k + 1] == "=" && !is_marker(&t[k]) && t[k] != "]" {
                    (column, element) = (&t[k], false);
                } else if is_marker(&t[k]) {
                    let spec = spec(&marker_name(&t[k], column), column);
                    binds.push(match (element, spec.typ()) {
                        (
                            true,
                            ColumnType::Collection {
                                typ: CollectionType::Map(key, value),
                                ..
                            },
                        ) => {
                            let typ = if t[k - 1] == "[" { key } else { value };
                            bind_spec(spec.name(), typ.as_ref().clone(), &table)
                        }
                        _ => spec,
                    });
                }
            }
        }
        let end = pos("ORDER").or(pos("LIMIT")).unwrap_or(t.len());
        let mut i = pos("WHERE").map_or(end, |w| w + 1);
        while i < end {
            if t[i] == "(" {
                let close = i + t[i..].iter().position(|x| x == ")").unwrap();
                let columns: Vec<&String> = t[i + 1..close].iter().filter(|x| *x != ",").collect();
                assert!(is_op(&t[close + 1]) && t[close + 2] == "(", "{cql}");
                let mclose = close + 2 + t[close + 2..].iter().position(|x| x == ")").unwrap();
                let markers: Vec<&String> =
                    t[close + 3..mclose].iter().filter(|x| *x != ",").collect();
                assert_eq!(columns.len(), markers.len(), "{cql}");
                for (c, m) in columns.iter().zip(markers) {
                    if is_marker(m) {
                        binds.push(spec(&marker_name(m, c), c));
                    }
                }
                i = mclose + 1;
            } else if i + 2 < end && is_op(&t[i + 1]) && is_marker(&t[i + 2]) {
                binds.push(spec(&marker_name(&t[i + 2], &t[i]), &t[i]));
                i += 3;
            } else if i + 2 < end && t[i + 1].eq_ignore_ascii_case("IN") && is_marker(&t[i + 2]) {
                // `c IN :cs` binds a list of the column's type.
                let one = spec(&t[i], &t[i]).typ().clone();
                let list = ColumnType::Collection {
                    frozen: false,
                    typ: CollectionType::List(Box::new(one)),
                };
                binds.push(bind_spec(&marker_name(&t[i + 2], &t[i]), list, &table));
                i += 3;
            } else {
                i += 1;
            }
        }
    }
    (binds, results)
}

/// The markers of a `USING TIMESTAMP ? AND TTL ?` clause (`tokens`): a bigint and an
/// int, named as the server names them.
fn using_binds(cql: &str, tokens: &[String], table: &str) -> Vec<ColumnSpec<'static>> {
    tokens
        .windows(2)
        .filter(|w| is_marker(&w[1]))
        .map(|pair| {
            let (name, kind) = match pair[0].to_ascii_uppercase().as_str() {
                "TIMESTAMP" => ("[timestamp]", NativeType::BigInt),
                "TTL" => ("[ttl]", NativeType::Int),
                other => panic!("{cql}: USING {other} ?"),
            };
            bind_spec(name, ColumnType::Native(kind), table)
        })
        .collect()
}

/// The spec of a marker or column `name` of type `typ` in `table` of the test keyspace.
fn bind_spec(name: &str, typ: ColumnType<'static>, table: &str) -> ColumnSpec<'static> {
    ColumnSpec::owned(
        name.to_owned(),
        typ,
        TableSpec::owned(KS.into(), table.to_owned()),
    )
}

pub(super) fn check_bind<T: SerializeRow>(cql: &str, row: &T) -> Result<usize, String> {
    let (binds, _) = specs(cql);
    let ctx = RowSerializationContext::from_specs(&binds);
    let mut buf = Vec::new();
    row.serialize(&ctx, &mut RowWriter::new(&mut buf))
        .map_err(|e| format!("{cql}: {e}"))?;
    Ok(buf.len())
}

pub(super) fn check_read<T: for<'f, 'm> DeserializeRow<'f, 'm>>(cql: &str) -> Result<(), String> {
    let (_, results) = specs(cql);
    assert!(!results.is_empty(), "{cql} reads no column");
    T::type_check(&results).map_err(|e| format!("{cql}: {e}"))
}
