// Each case must be rejected with the message after `error:`.
// error: unknown element type 'f33'
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f33>) {
    func.return
  }
}
// -----
// error: size symbol 'seq' is not declared
builtin.module {
  func.func @f(%x : !plait.tensor<[seq], f32>) {
    func.return
  }
}
// -----
// error: plait.linear cannot call 'aten::relu'; use plait.elementwise for it
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.linear "aten::relu"(%x) : !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: is not an operator schema name
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.call "relu"(%x) : !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: value %z is used before it is defined
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.elementwise "aten::relu"(%z) : !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: unknown argument keyword 'bogus'
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.elementwise "aten::add.Tensor"(%x, bogus) : !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: unknown function 'log' in a dimension expression
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 8]>} {
  func.func @f(%x : !plait.tensor<[log(n)], f32>) {
    func.return
  }
}
// -----
// error: floordiv() takes 2 arguments, got 1
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 8]>} {
  func.func @f(%x : !plait.tensor<[floordiv(n)], f32>) {
    func.return
  }
}
// -----
// error: division by zero
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 8]>} {
  func.func @f(%x : !plait.tensor<[floordiv(n, 0)], f32>) {
    func.return
  }
}
// -----
// error: positional argument after keyword arguments
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.elementwise "aten::add.Tensor"(%x, alpha = 2, %x) : !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: keyword argument 'alpha' given twice
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.elementwise "aten::add.Tensor"(%x, %x, alpha = 2, alpha = 3) : !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: param kind 'weight' is not one of parameter, buffer, constant
builtin.module {
  func.func @f() {
    %w = "plait.param"() <{name = "w", kind = "weight"}> : () -> !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: arguments must refer to each of the 2 operands once, in order
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = "plait.elementwise"(%x, %x) <{target = "aten::add.Tensor", args = #plait.args<operand(1), operand(0)>}> : (!plait.tensor<[2], f32>, !plait.tensor<[2], f32>) -> !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: the result type does not match the `async` flag
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.all_reduce %x {axis = "tp", reduce = "sum", async} : !plait.tensor<[2], f32> -> !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: unknown reduction 'median'
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.all_reduce %x {axis = "tp", reduce = "median"} : !plait.tensor<[2], f32> -> !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: an async value must be waited on exactly once
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %h = plait.all_reduce %x {axis = "tp", reduce = "sum", async} : !plait.tensor<[2], f32> -> !plait.async<!plait.tensor<[2], f32>>
    %a = plait.wait %h : !plait.async<!plait.tensor<[2], f32>> -> !plait.tensor<[2], f32>
    %b = plait.wait %h : !plait.async<!plait.tensor<[2], f32>> -> !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: cannot change the element type
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.all_gather %x {axis = "tp", dim = 0 : i64} : !plait.tensor<[2], f32> -> !plait.tensor<[4], f16>
    func.return
  }
}
// -----
// error: plait.quant has no field 'bitz'
builtin.module attributes {q = #plait.quant<bitz = 4>} {
}
// -----
// error: Expected integer literal
builtin.module attributes {s = #plait.symbols<n = [1, x]>} {
}
// -----
// error: unknown dtype 'f99'
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.elementwise "aten::to.dtype"(%x, dtype(f99)) : !plait.tensor<[2], f32>
    func.return
  }
}
// -----
// error: Operation has 2 results, but was given 1 to bind
builtin.module {
  func.func @f(%x : !plait.tensor<[2], f32>) {
    %y = plait.call "aten::topk"(%x, 1) : (!plait.tensor<[1], f32>, !plait.tensor<[1], i64>)
    func.return
  }
}
// -----
// error: size symbol 'n' is declared twice
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 8], n = [2, 4]>} {
}
// -----
// error: size symbol 'n' has an empty range [8, 2]
builtin.module attributes {plait.symbols = #plait.symbols<n = [8, 2]>} {
}
// -----
// error: mesh axis 'tp' must have at least 1 device
builtin.module attributes {m = #plait.mesh<tp = 0>} {
}
// -----
// error: Expected one of 'avg', 'max', 'min', 'product', 'sum' (a reduction)
builtin.module attributes {p = #plait.placements<[partial(median)]>} {
}
