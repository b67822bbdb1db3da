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
// -----
// error: plait.linear: result is declared tensor<[n, 177], f32>, but aten::linear computes tensor<[n, 176], f32>
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 64]>} {
  func.func @f(%x : !plait.tensor<[n, 64], f32>) {
    %w = plait.param "fc.weight" : !plait.tensor<[176, 64], f32>
    %y = plait.linear "aten::linear"(%x, %w, none) : !plait.tensor<[n, 177], f32> loc("model.fc")
    func.return
  }
}
// -----
// error: result is declared tensor<[n, 176], f16>, but aten::linear computes tensor<[n, 176], f32>
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 64]>} {
  func.func @f(%x : !plait.tensor<[n, 64], f32>) {
    %w = plait.param "fc.weight" : !plait.tensor<[176, 64], f32>
    %y = plait.linear "aten::linear"(%x, %w, none) : !plait.tensor<[n, 176], f16>
    func.return
  }
}
// -----
// error: aten::linear rejects its arguments
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 64]>} {
  func.func @f(%x : !plait.tensor<[n, 63], f32>) {
    %w = plait.param "fc.weight" : !plait.tensor<[176, 64], f32>
    %y = plait.linear "aten::linear"(%x, %w, none) : !plait.tensor<[n, 176], f32>
    func.return
  }
}
// -----
// error: aten::view rejects its arguments: shape
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 64]>} {
  func.func @f(%x : !plait.tensor<[n, 64], f32>) {
    %y = plait.reshape "aten::view"(%x, [sym(n), 3, -1]) : !plait.tensor<[n, 3, 21], f32>
    func.return
  }
}
// -----
// error: view size is not compatible with input tensor's size and stride
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 64]>} {
  func.func @f(%x : !plait.tensor<[n, 64], f32>) {
    %t = plait.reshape "aten::transpose.int"(%x, 0, 1) : !plait.tensor<[64, n], f32>
    %y = plait.reshape "aten::view"(%t, [-1]) : !plait.tensor<[64*n], f32>
    func.return
  }
}
// -----
// error: result is declared tensor<[a, b], f32>, but aten::transpose.int computes tensor<[b, a], f32>
builtin.module attributes {plait.symbols = #plait.symbols<a = [1, 64], b = [1, 64]>} {
  func.func @f(%x : !plait.tensor<[a, b], f32>) {
    %y = plait.reshape "aten::transpose.int"(%x, 0, 1) : !plait.tensor<[a, b], f32>
    func.return
  }
}
// -----
// error: aten::topk returns 2 tensor(s) but the op declares 1 result(s)
builtin.module {
  func.func @f(%x : !plait.tensor<[4, 8], f32>) {
    %y = plait.call "aten::topk"(%x, 2) : !plait.tensor<[4, 2], f32>
    func.return
  }
}
// -----
// error: result is declared tensor<[n, 16], f32>, but plait.all_gather over 'tp' (2 ranks) gives tensor<[n, 32], f32>
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 64]>, plait.mesh = #plait.mesh<tp = 2>} {
  func.func @f(%x : !plait.tensor<[n, 16], f32>) {
    %y = plait.all_gather %x {axis = "tp", dim = 1 : i64} : !plait.tensor<[n, 16], f32> -> !plait.tensor<[n, 16], f32>
    func.return
  }
}
// -----
// error: plait.reduce_scatter: dim 1 of size 15 does not split over 2 ranks
builtin.module attributes {plait.mesh = #plait.mesh<tp = 2>} {
  func.func @f(%x : !plait.tensor<[4, 15], f32>) {
    %y = plait.reduce_scatter %x {axis = "tp", dim = 1 : i64, reduce = "sum"} : !plait.tensor<[4, 15], f32> -> !plait.tensor<[4, 7], f32>
    func.return
  }
}
// -----
// error: mesh axis 'dp' is not an axis of the module's plait.mesh (axes: tp)
builtin.module attributes {plait.mesh = #plait.mesh<tp = 2>} {
  func.func @f(%x : !plait.tensor<[4, 16], f32>) {
    %y = plait.all_reduce %x {axis = "dp", reduce = "sum"} : !plait.tensor<[4, 16], f32> -> !plait.tensor<[4, 16], f32>
    func.return
  }
}
// -----
// error: result is declared tensor<[4, 16], f32>, but plait.local_shard over 'tp' (4 ranks) gives tensor<[4, 4], f32>
builtin.module attributes {plait.mesh = #plait.mesh<tp = 4>} {
  func.func @f(%x : !plait.tensor<[4, 16], f32>) {
    %y = plait.local_shard %x {axis = "tp", dim = 1 : i64} : !plait.tensor<[4, 16], f32> -> !plait.tensor<[4, 16], f32>
    func.return
  }
}
// -----
// error: split_dim = 2 is not a dim of a rank-2 tensor
builtin.module attributes {plait.mesh = #plait.mesh<tp = 2>} {
  func.func @f(%x : !plait.tensor<[4, 16], f32>) {
    %y = plait.all_to_all %x {axis = "tp", split_dim = 2 : i64, concat_dim = 0 : i64} : !plait.tensor<[4, 16], f32> -> !plait.tensor<[8, 8], f32>
    func.return
  }
}
// -----
// error: placement shard(3) names dim 3 of a rank-2 weight
builtin.module attributes {plait.mesh = #plait.mesh<tp = 2>} {
  func.func @f() {
    %w = plait.param "w" {plait.placements = #plait.placements<[shard(3)]>} : !plait.tensor<[64, 32], f32>
    func.return
  }
}
// -----
// error: the blocks must each split over 2 ranks and add up to the whole dim, 2 x 32
builtin.module attributes {plait.mesh = #plait.mesh<tp = 2>} {
  func.func @f() {
    %w = plait.param "w" {plait.placements = #plait.placements<[shard(0, blocks = [32, 16, 8])]>} : !plait.tensor<[32, 64], f32>
    func.return
  }
}
// -----
// error: aten::linear needs operands of one element type; they are f32, i64
builtin.module {
  func.func @f(%x : !plait.tensor<[2, 64], f32>) {
    %w = plait.param "fc.weight" : !plait.tensor<[176, 64], i64>
    %y = plait.linear "aten::linear"(%x, %w, none) : !plait.tensor<[2, 176], f32>
    func.return
  }
}
// -----
// error: argument 'size' of aten::view is List[int], not a tensor
builtin.module {
  func.func @f(%x : !plait.tensor<[2, 64], f32>, %i : !plait.tensor<[1], i64>) {
    %y = plait.call "aten::view"(%x, [%i, %i]) : !plait.tensor<[2, 64], f32>
    func.return
  }
}
// -----
// error: aten::__and__.Tensor takes integer or i1 tensors, not f32, i1
builtin.module {
  func.func @f(%x : !plait.tensor<[2, 64], f32>, %m : !plait.tensor<[2, 64], i1>) {
    %y = plait.elementwise "aten::__and__.Tensor"(%m, %x) : !plait.tensor<[2, 64], f32>
    func.return
  }
}
