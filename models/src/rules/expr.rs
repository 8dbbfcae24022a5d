//! The expressions of `expression` rules: arithmetic and comparisons over a twin's latest
//! metric values, joined with `&&`, `||` and `!`.
//!
//! ```text
//! expr    := or
//! or      := and ("||" and)*
//! and     := not ("&&" not)*
//! not     := "!" not | cmp
//! cmp     := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
//! sum     := term (("+" | "-") term)*
//! term    := unary (("*" | "/") unary)*
//! unary   := "-" unary | atom
//! atom    := number | metric | fn "(" sum ("," sum)* ")" | "(" expr ")"
//! metric  := [A-Za-z_][A-Za-z0-9_.:]*  |  `any metric name`
//! fn      := abs | min | max
//! ```
//!
//! A whole expression must be a condition (a comparison or a logical join of them). A
//! metric with no value yet makes what depends on it unknown: the rule's state does not
//! change (`a || b` is true when one side is true, `a && b` false when one side is false).

use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Metric(String),
    Neg(Box<Expr>),
    Arith(char, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Abs,
    Min,
    Max,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    Quoted(String),
    Op(&'static str),
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, String> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                i += 1;
                if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
                    i += 1;
                }
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let n: f64 = src[start..i].parse().map_err(|_| format!("bad number {:?} at {start}", &src[start..i]))?;
            out.push((start, Tok::Num(n)));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b':')) {
                i += 1;
            }
            out.push((start, Tok::Ident(src[start..i].to_string())));
            continue;
        }
        if c == b'`' {
            let end = src[i + 1..].find('`').ok_or_else(|| format!("a quoted metric name at {start} is not closed"))?;
            out.push((start, Tok::Quoted(src[i + 1..i + 1 + end].to_string())));
            i += end + 2;
            continue;
        }
        let two = src.get(i..i + 2).unwrap_or("");
        let op = ["<=", ">=", "==", "!=", "&&", "||"].into_iter().find(|o| *o == two);
        if let Some(op) = op {
            out.push((start, Tok::Op(op)));
            i += 2;
            continue;
        }
        let one = ["<", ">", "!", "+", "-", "*", "/", "(", ")", ","].into_iter().find(|o| o.as_bytes()[0] == c);
        match one {
            Some(op) => {
                out.push((start, Tok::Op(op)));
                i += 1;
            }
            None => return Err(format!("unexpected {:?} at {start}", src[start..].chars().next().unwrap_or(' '))),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
}

impl Parser {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.toks.get(self.pos), Some((_, Tok::Op(o))) if *o == op)
    }

    fn eat(&mut self, op: &str) -> bool {
        let hit = self.peek_op(op);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.len, |(p, _)| *p)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.eat("||") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.not()?;
        while self.eat("&&") {
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, String> {
        let a = self.sum()?;
        let ops = [
            ("<=", CmpOp::Le),
            (">=", CmpOp::Ge),
            ("==", CmpOp::Eq),
            ("!=", CmpOp::Ne),
            ("<", CmpOp::Lt),
            (">", CmpOp::Gt),
        ];
        for (s, op) in ops {
            if self.eat(s) {
                return Ok(Expr::Cmp(op, Box::new(a), Box::new(self.sum()?)));
            }
        }
        Ok(a)
    }

    fn sum(&mut self) -> Result<Expr, String> {
        let mut e = self.term()?;
        loop {
            let op = if self.eat("+") {
                '+'
            } else if self.eat("-") {
                '-'
            } else {
                return Ok(e);
            };
            e = Expr::Arith(op, Box::new(e), Box::new(self.term()?));
        }
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        loop {
            let op = if self.eat("*") {
                '*'
            } else if self.eat("/") {
                '/'
            } else {
                return Ok(e);
            };
            e = Expr::Arith(op, Box::new(e), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, String> {
        let at = self.at();
        let Some((_, tok)) = self.toks.get(self.pos).cloned() else {
            return Err(format!("the expression ends where a value is expected (at {at})"));
        };
        self.pos += 1;
        match tok {
            Tok::Num(n) => Ok(Expr::Num(n)),
            Tok::Quoted(name) => Ok(Expr::Metric(name)),
            Tok::Ident(name) if self.peek_op("(") => {
                let f = match name.as_str() {
                    "abs" => Func::Abs,
                    "min" => Func::Min,
                    "max" => Func::Max,
                    other => return Err(format!("unknown function {other:?} at {at}; there are abs, min, max")),
                };
                self.pos += 1;
                let mut args = vec![self.sum()?];
                while self.eat(",") {
                    args.push(self.sum()?);
                }
                if !self.eat(")") {
                    return Err(format!("missing `)` at {}", self.at()));
                }
                if (f == Func::Abs) != (args.len() == 1) || args.is_empty() {
                    return Err(format!(
                        "{name} at {at} takes {}",
                        if f == Func::Abs { "one value" } else { "two or more values" }
                    ));
                }
                Ok(Expr::Call(f, args))
            }
            Tok::Ident(name) => Ok(Expr::Metric(name)),
            Tok::Op("(") => {
                let e = self.or()?;
                if !self.eat(")") {
                    return Err(format!("missing `)` at {}", self.at()));
                }
                Ok(e)
            }
            Tok::Op(op) => Err(format!("unexpected `{op}` at {at}")),
        }
    }
}

impl Expr {
    /// Parses a condition: the whole must compare something.
    pub fn parse(src: &str) -> Result<Expr, String> {
        let toks = lex(src)?;
        let mut p = Parser { toks, pos: 0, len: src.len() };
        let e = p.or()?;
        if p.pos < p.toks.len() {
            return Err(format!("unexpected text at {}", p.at()));
        }
        e.check(true)?;
        Ok(e)
    }

    fn is_condition(&self) -> bool {
        matches!(self, Expr::Cmp(..) | Expr::And(..) | Expr::Or(..) | Expr::Not(..))
    }

    /// Conditions where conditions belong and numbers where numbers do.
    fn check(&self, want_condition: bool) -> Result<(), String> {
        // (The parts first: the innermost mistake is the one to name.)
        match self {
            Expr::Num(_) | Expr::Metric(_) => Ok(()),
            Expr::Neg(a) => a.check(false),
            Expr::Arith(_, a, b) | Expr::Cmp(_, a, b) => a.check(false).and(b.check(false)),
            Expr::Call(_, args) => args.iter().try_for_each(|a| a.check(false)),
            Expr::And(a, b) | Expr::Or(a, b) => a.check(true).and(b.check(true)),
            Expr::Not(a) => a.check(true),
        }?;
        if self.is_condition() != want_condition {
            return Err(if want_condition {
                "this part compares nothing: use a comparison such as `temp > 80`".into()
            } else {
                "a comparison is used as a number".into()
            });
        }
        Ok(())
    }

    /// The metrics it reads.
    pub fn metrics(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.collect(&mut out);
        out
    }

    fn collect(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::Num(_) => {}
            Expr::Metric(m) => {
                out.insert(m.clone());
            }
            Expr::Neg(a) | Expr::Not(a) => a.collect(out),
            Expr::Arith(_, a, b) | Expr::Cmp(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
                a.collect(out);
                b.collect(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.collect(out)),
        }
    }

    /// A number's value, `None` while a metric it reads has none.
    fn value(&self, get: &dyn Fn(&str) -> Option<f64>) -> Option<f64> {
        Some(match self {
            Expr::Num(n) => *n,
            Expr::Metric(m) => get(m)?,
            Expr::Neg(a) => -a.value(get)?,
            Expr::Arith(op, a, b) => {
                let (a, b) = (a.value(get)?, b.value(get)?);
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    _ => a / b,
                }
            }
            Expr::Call(f, args) => {
                let vals: Option<Vec<f64>> = args.iter().map(|a| a.value(get)).collect();
                let vals = vals?;
                match f {
                    Func::Abs => vals[0].abs(),
                    Func::Min => vals.iter().copied().fold(f64::INFINITY, f64::min),
                    Func::Max => vals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                }
            }
            _ => return None,
        })
    }

    /// A condition's truth, `None` while unknown.
    pub fn holds(&self, get: &dyn Fn(&str) -> Option<f64>) -> Option<bool> {
        match self {
            Expr::Cmp(op, a, b) => {
                let (a, b) = (a.value(get)?, b.value(get)?);
                Some(match op {
                    CmpOp::Lt => a < b,
                    CmpOp::Le => a <= b,
                    CmpOp::Gt => a > b,
                    CmpOp::Ge => a >= b,
                    CmpOp::Eq => a == b,
                    CmpOp::Ne => a != b,
                })
            }
            Expr::And(a, b) => match (a.holds(get), b.holds(get)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Expr::Or(a, b) => match (a.holds(get), b.holds(get)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Expr::Not(a) => a.holds(get).map(|v| !v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<'a>(vals: &'a [(&'a str, f64)]) -> impl Fn(&str) -> Option<f64> + 'a {
        move |m| vals.iter().find(|(k, _)| *k == m).map(|(_, v)| *v)
    }

    #[test]
    fn expressions_parse_evaluate_and_say_what_is_wrong() {
        let e = Expr::parse("temp > 80 && (humidity < 20 || `fan-speed` == 0)").unwrap();
        assert_eq!(e.metrics().into_iter().collect::<Vec<_>>(), ["fan-speed", "humidity", "temp"]);
        assert_eq!(e.holds(&with(&[("temp", 81.0), ("humidity", 50.0), ("fan-speed", 0.0)])), Some(true));
        assert_eq!(e.holds(&with(&[("temp", 79.0)])), Some(false), "false && unknown is false");
        assert_eq!(e.holds(&with(&[("temp", 81.0)])), None, "unknown while a metric has no value");
        let arith = Expr::parse("abs(power.in - power.out) / max(power.in, 1) >= 0.1e0 * 2").unwrap();
        assert_eq!(arith.holds(&with(&[("power.in", 100.0), ("power.out", 75.0)])), Some(true));
        assert_eq!(Expr::parse("!(-cpu < -90)").unwrap().holds(&with(&[("cpu", 95.0)])), Some(false));
        for (bad, says) in [
            ("temp > ", "ends where a value is expected"),
            ("temp + 1", "compares nothing"),
            ("(a > 1) + 2", "comparison is used as a number"),
            ("a > 1 b", "unexpected text"),
            ("sqrt(a) > 1", "unknown function \"sqrt\""),
            ("abs(a, b) > 1", "takes one value"),
            ("`open > 1", "not closed"),
            ("a # 1", "unexpected '#'"),
            ("(a > 1", "missing `)`"),
        ] {
            let e = Expr::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
